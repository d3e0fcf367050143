"""The simple baseline: conv encoder -> fully connected latent bottleneck -> transposed-conv
decoder. The dense layers fix the input size (`tile`); larger images run tile by tile with
overlap and blending inside forward(), invisible to callers."""
from __future__ import annotations

import torch
from torch import nn

from ..tiling import tiled_forward
from . import register
from .common import activation


@register("autoencoder", tiny={"tile": 32, "depth": 2, "width": 8, "latent": 32, "overlap": 8})
class Autoencoder(nn.Module):
    def __init__(self, channels: int = 1, tile: int = 64, depth: int = 3, width: int = 32, latent: int = 256,
                 batch_norm: bool = True, dropout: float = 0.0, act: str = "relu", output: str = "sigmoid",
                 overlap: int = 16):
        super().__init__()
        if tile % (2**depth):
            raise ValueError(f"autoencoder tile {tile} must be a multiple of 2**depth = {2**depth}")
        if output not in ("sigmoid", "clamp"):
            raise ValueError(f"autoencoder output must be 'sigmoid' or 'clamp', got {output!r}")
        self.channels, self.tile, self.overlap, self.output, self.latent = channels, tile, overlap, output, latent
        enc, c = [], channels
        for i in range(depth):
            c_out = width * 2**i
            enc += [nn.Conv2d(c, c_out, 3, stride=2, padding=1)]
            enc += [nn.BatchNorm2d(c_out)] if batch_norm else []
            enc += [activation(act)]
            c = c_out
        self.encoder = nn.Sequential(*enc)
        self.code_shape = (c, tile // 2**depth, tile // 2**depth)
        flat = c * self.code_shape[1] * self.code_shape[2]
        self.bottleneck = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(flat, latent), activation(act),
                                        nn.Dropout(dropout), nn.Linear(latent, flat), activation(act))
        dec = []
        for i in reversed(range(depth)):
            c_out = width * 2 ** (i - 1) if i else width
            dec += [nn.ConvTranspose2d(c, c_out, 4, stride=2, padding=1)]
            dec += [nn.BatchNorm2d(c_out)] if batch_norm else []
            dec += [activation(act)]
            c = c_out
        dec.append(nn.Conv2d(c, channels, 3, padding=1))
        self.decoder = nn.Sequential(*dec)

    def compression_ratio(self) -> float:
        """Input values per latent value."""
        return self.channels * self.tile**2 / self.latent

    def forward_tile(self, x: torch.Tensor) -> torch.Tensor:
        z = self.bottleneck(self.encoder(x)).view(-1, *self.code_shape)
        y = self.decoder(z)
        return torch.sigmoid(y) if self.output == "sigmoid" else y.clamp(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.tile, self.tile):
            return self.forward_tile(x)
        return tiled_forward(self.forward_tile, x, self.tile, self.overlap)
