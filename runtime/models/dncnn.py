"""DnCNN (Zhang et al., TIP 2017): conv-ReLU, (depth-2) x conv-BN-ReLU, conv; predicts the
residual, which is added back to the input (global residual learning)."""
from __future__ import annotations

import torch
from torch import nn

from . import register
from .common import zero_init_


@register("dncnn", tiny={"depth": 5, "width": 8})
class DnCNN(nn.Module):
    def __init__(self, channels: int = 1, depth: int = 17, width: int = 64, batch_norm: bool = True, cond_channels: int = 0):
        super().__init__()
        self.channels = channels
        layers = [nn.Conv2d(channels + cond_channels, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=not batch_norm)]
            layers += [nn.BatchNorm2d(width)] if batch_norm else []
            layers += [nn.ReLU(inplace=True)]
        layers.append(zero_init_(nn.Conv2d(width, channels, 3, padding=1)))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :self.channels] + self.body(x)
