"""Helpers shared by architectures: padding to a multiple, activations, zero-initialised residual branches,
FiLM conditioning on the JPEG quality."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "prelu": nn.PReLU, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def zero_init_(layer: nn.Module) -> nn.Module:
    """Zero the last layer of a residual branch: an untrained model is the identity (= its JPEG
    input), so training starts at the JPEG baseline instead of below it."""
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad H and W up to a multiple; returns the padded tensor and the original size."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)


class FiLM(nn.Module):
    """Feature-wise modulation by the quality (Perez et al., 2018): a small MLP maps the quality
    vector to a per-channel scale and shift, y * (1 + scale) + shift. Its last layer starts at
    zero, so an untrained FiLM is the identity (and a blind model's weights start as themselves).
    The quality plane holds q/255 (q10-40: 0.04-0.16): ten times that spreads it over the MLP's
    unit range, where its first layer tells the qualities apart from the start."""

    def __init__(self, cond_channels: int, channels: int, hidden: int = 32, input_gain: float = 10.0):
        super().__init__()
        self.input_gain = input_gain
        self.mlp = nn.Sequential(nn.Linear(cond_channels, hidden), nn.SiLU(), zero_init_(nn.Linear(hidden, 2 * channels)))

    def forward(self, y: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
        scale, shift = self.mlp(self.input_gain * quality).to(y.dtype)[:, :, None, None].chunk(2, dim=1)
        return y * (1 + scale) + shift


class FiLMStack(nn.ModuleList):
    """One FiLM per stage of a network told the quality, indexed in the order its forward runs the
    stages. The quality planes follow the image channels in the input; their mean is the quality."""

    def __init__(self, cond_channels: int, widths: list[int]):
        if not cond_channels:
            raise ValueError("film = true modulates by the quality: it needs cond_channels >= 1")
        super().__init__(FiLM(cond_channels, c) for c in widths)

    @staticmethod
    def split(x: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image channels, quality vector) of an input whose planes follow the image."""
        return x[:, :channels], x[:, channels:].mean((2, 3))


def modulate(film: FiLMStack | None, i: int, y: torch.Tensor, quality: torch.Tensor | None) -> torch.Tensor:
    """Stage i's FiLM applied to y, or y itself in a blind network."""
    return y if film is None else film[i](y, quality)
