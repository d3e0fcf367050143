"""DRUNet-style residual U-Net (Zhang et al., TPAMI 2021, "Plug-and-Play Image Restoration"):
residual blocks (conv-ReLU-conv, no BatchNorm) at every scale, strided-conv downsampling,
transposed-conv upsampling, additive skips and a global residual."""
from __future__ import annotations

import torch
from torch import nn

from . import register
from .common import pad_to_multiple, zero_init_


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


@register("drunet", tiny={"width": 8, "levels": 2, "blocks": 1})
class DRUNet(nn.Module):
    def __init__(self, channels: int = 1, width: int = 64, levels: int = 4, blocks: int = 4, cond_channels: int = 0):
        super().__init__()
        if levels < 1:
            raise ValueError(f"drunet: levels must be at least 1, got {levels}")
        self.levels, self.channels = levels, channels
        widths = [width * 2 ** min(i, 3) for i in range(levels)]
        self.head = nn.Conv2d(channels + cond_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList([nn.Sequential(*[ResBlock(widths[i]) for _ in range(blocks)],
                                                 nn.Conv2d(widths[i], widths[i + 1], 2, stride=2))
                                   for i in range(levels - 1)])
        self.body = nn.Sequential(*[ResBlock(widths[-1]) for _ in range(blocks)])
        self.up = nn.ModuleList([nn.Sequential(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2),
                                               *[ResBlock(widths[i]) for _ in range(blocks)])
                                 for i in reversed(range(levels - 1))])
        self.tail = zero_init_(nn.Conv2d(widths[0], channels, 3, padding=1))

    @property
    def size_multiple(self) -> int:
        return 2 ** (self.levels - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp, (h, w) = pad_to_multiple(x, self.size_multiple)
        y = self.head(xp)
        skips = []
        for down in self.down:
            skips.append(y)
            y = down(y)
        y = self.body(y)
        for up, skip in zip(self.up, reversed(skips)):
            y = up(y) + skip
        return (xp[:, :self.channels] + self.tail(y))[..., :h, :w]
