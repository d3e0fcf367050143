"""NAFNet (Chen et al., ECCV 2022, "Simple Baselines for Image Restoration"): a U-Net of
nonlinear-activation-free blocks (LayerNorm, depthwise conv, SimpleGate, simplified channel
attention, gated FFN, learned residual scales), strided-conv down, pixel-shuffle up, global
residual. Defaults: the paper's width-32 denoising model (SIDD). Told the quality (`cond_channels`),
it reads the planes as extra input channels, or with `film=True` as a FiLM modulation of every
encoder group, the middle and every decoder group (as the U-Net does)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import register
from .common import FiLMStack, modulate, pad_to_multiple, zero_init_


class LayerNorm2d(nn.Module):
    """LayerNorm over channels of an NCHW tensor. Stored channels_last (training, CPU inference), the
    channels are its innermost dimension and torch's fused layer_norm runs on it as it lies (2-3.5x
    faster on a CPU than the ops spelled out, which stay for NCHW: there layer_norm would copy).
    Exported to ONNX it is one LayerNormalization node between transposes: TensorRT runs it as its
    normalization layer, in fp32 inside an fp16 engine (the spelled-out mean of squares in fp16 is
    what NVIDIA warns may overflow)."""

    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)), eps

    def forward(self, x):
        if torch.onnx.is_in_onnx_export() or (x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()):
            return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps).permute(0, 3, 1, 2)
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        return (x - mu) / torch.sqrt(var + self.eps) * self.weight[:, None, None] + self.bias[:, None, None]


class SimpleGate(nn.Module):
    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return a * b


class NAFBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm1, self.norm2 = LayerNorm2d(c), LayerNorm2d(c)
        self.conv = nn.Sequential(nn.Conv2d(c, 2 * c, 1), nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c), SimpleGate())
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c, 1))
        self.proj = nn.Conv2d(c, c, 1)
        self.ffn = nn.Sequential(nn.Conv2d(c, 2 * c, 1), SimpleGate(), nn.Conv2d(c, c, 1))
        self.beta, self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1)), nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x):
        y = self.conv(self.norm1(x))
        y = x + self.proj(y * self.sca(y)) * self.beta
        return y + self.ffn(self.norm2(y)) * self.gamma


@register("nafnet", tiny={"width": 8, "enc_blocks": [1, 1], "middle_blocks": 1})
class NAFNet(nn.Module):
    def __init__(self, channels: int = 1, width: int = 32, enc_blocks: list = (2, 2, 4, 8), middle_blocks: int = 12,
                 dec_blocks: list | None = None, cond_channels: int = 0, film: bool = False):
        super().__init__()
        self.channels = channels
        enc_blocks = list(enc_blocks)
        dec_blocks = list(dec_blocks) if dec_blocks is not None else [1] * len(enc_blocks)
        if len(dec_blocks) != len(enc_blocks):
            raise ValueError(f"nafnet: dec_blocks needs {len(enc_blocks)} entries like enc_blocks, got {len(dec_blocks)}")
        self.intro = nn.Conv2d(channels + (0 if film else cond_channels), width, 3, padding=1)
        self.encoders, self.downs, self.ups, self.decoders = nn.ModuleList(), nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        c = width
        for n in enc_blocks:
            self.encoders.append(nn.Sequential(*[NAFBlock(c) for _ in range(n)]))
            self.downs.append(nn.Conv2d(c, 2 * c, 2, stride=2))
            c *= 2
        self.middle = nn.Sequential(*[NAFBlock(c) for _ in range(middle_blocks)])
        for n in reversed(dec_blocks):
            self.ups.append(nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.PixelShuffle(2)))
            c //= 2
            self.decoders.append(nn.Sequential(*[NAFBlock(c) for _ in range(n)]))
        self.ending = zero_init_(nn.Conv2d(width, channels, 3, padding=1))
        self.size_multiple = 2 ** len(enc_blocks)
        # one FiLM per group of blocks, in the order forward runs them: encoders, middle, decoders
        widths = [width * 2**i for i in range(len(enc_blocks) + 1)]
        self.film = FiLMStack(cond_channels, widths + widths[-2::-1]) if film else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp, (h, w) = pad_to_multiple(x, self.size_multiple)
        y, quality = FiLMStack.split(xp, self.channels) if self.film is not None else (xp, None)
        y, skips, levels = self.intro(y), [], len(self.encoders)
        for i, (enc, down) in enumerate(zip(self.encoders, self.downs)):
            y = modulate(self.film, i, enc(y), quality)
            skips.append(y)
            y = down(y)
        y = modulate(self.film, levels, self.middle(y), quality)
        for i, (up, dec, skip) in enumerate(zip(self.ups, self.decoders, reversed(skips))):
            y = modulate(self.film, levels + 1 + i, dec(up(y) + skip), quality)
        return (xp[:, :self.channels] + self.ending(y))[..., :h, :w]
