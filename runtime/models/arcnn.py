"""ARCNN (Dong et al., ICCV 2015): feature extraction 9x9, enhancement 7x7, mapping 1x1,
reconstruction 5x5, with PReLU."""
from __future__ import annotations

from torch import nn

from . import register
from .common import zero_init_


@register("arcnn", tiny={"widths": [8, 8, 4]})
class ARCNN(nn.Module):
    def __init__(self, channels: int = 1, widths: tuple[int, int, int] = (64, 32, 16), residual: bool = False):
        super().__init__()
        w1, w2, w3 = widths
        self.residual = residual
        self.body = nn.Sequential(
            nn.Conv2d(channels, w1, 9, padding=4), nn.PReLU(w1),
            nn.Conv2d(w1, w2, 7, padding=3), nn.PReLU(w2),
            nn.Conv2d(w2, w3, 1), nn.PReLU(w3),
            nn.Conv2d(w3, channels, 5, padding=2),
        )
        if residual:
            zero_init_(self.body[-1])

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y
