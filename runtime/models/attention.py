"""Residual network with channel attention (RCAN, Zhang et al., ECCV 2018): residual groups of
residual channel-attention blocks, long skip per group and a global residual."""
from __future__ import annotations

import torch
from torch import nn

from . import register
from .common import zero_init_


class ChannelAttention(nn.Module):
    def __init__(self, width: int, reduction: int):
        super().__init__()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(width, max(1, width // reduction), 1),
                                  nn.ReLU(inplace=True), nn.Conv2d(max(1, width // reduction), width, 1), nn.Sigmoid())

    def forward(self, x):
        return x * self.gate(x)


class RCAB(nn.Module):
    def __init__(self, width: int, reduction: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(width, width, 3, padding=1), ChannelAttention(width, reduction))

    def forward(self, x):
        return x + self.body(x)


class ResidualGroup(nn.Module):
    def __init__(self, width: int, blocks: int, reduction: int):
        super().__init__()
        self.body = nn.Sequential(*[RCAB(width, reduction) for _ in range(blocks)], nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


@register("attention", tiny={"width": 8, "groups": 1, "blocks": 2, "reduction": 4})
class RCAN(nn.Module):
    def __init__(self, channels: int = 1, width: int = 48, groups: int = 3, blocks: int = 4, reduction: int = 8):
        super().__init__()
        self.head = nn.Conv2d(channels, width, 3, padding=1)
        self.body = nn.Sequential(*[ResidualGroup(width, blocks, reduction) for _ in range(groups)],
                                  nn.Conv2d(width, width, 3, padding=1))
        self.tail = zero_init_(nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.head(x)
        return x + self.tail(f + self.body(f))
