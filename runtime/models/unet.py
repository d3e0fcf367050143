"""U-Net: encoder-decoder with skip connections (concatenation) and a global residual
(`skips=False`, `residual=False` and `dropout` exist for ablations)."""
from __future__ import annotations

import torch
from torch import nn

from . import register
from .common import activation, pad_to_multiple, zero_init_


def _block(c_in: int, c_out: int, act: str, batch_norm: bool) -> nn.Sequential:
    layers = []
    for c in (c_in, c_out):
        layers += [nn.Conv2d(c, c_out, 3, padding=1, bias=not batch_norm)]
        layers += [nn.BatchNorm2d(c_out)] if batch_norm else []
        layers += [activation(act)]
    return nn.Sequential(*layers)


@register("unet", tiny={"width": 8, "levels": 2})
class UNet(nn.Module):
    def __init__(self, channels: int = 1, width: int = 32, levels: int = 3, batch_norm: bool = False, act: str = "relu",
                 skips: bool = True, residual: bool = True, dropout: float = 0.0, cond_channels: int = 0):
        super().__init__()
        self.levels, self.skips, self.residual, self.channels = levels, skips, residual, channels
        widths = [width * 2**i for i in range(levels + 1)]
        self.down = nn.ModuleList([_block(channels + cond_channels if i == 0 else widths[i - 1], widths[i], act, batch_norm)
                                   for i in range(levels)])
        self.pool = nn.MaxPool2d(2)
        self.bottom = _block(widths[levels - 1], widths[levels], act, batch_norm)
        self.dropout = nn.Dropout2d(dropout)  # on the bottleneck features, training only
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(levels))])
        self.merge = nn.ModuleList([_block((2 if skips else 1) * widths[i], widths[i], act, batch_norm)
                                    for i in reversed(range(levels))])
        self.head = nn.Conv2d(width, channels, 1)
        if residual:
            zero_init_(self.head)

    @property
    def size_multiple(self) -> int:
        """Height and width are padded to a multiple of this inside forward (compiled exports take it as given)."""
        return 2**self.levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp, (h, w) = pad_to_multiple(x, 2**self.levels)
        skips, y = [], xp
        for block in self.down:
            y = block(y)
            skips.append(y)
            y = self.pool(y)
        y = self.dropout(self.bottom(y))
        for up, merge, skip in zip(self.up, self.merge, reversed(skips)):
            y = merge(torch.cat([up(y), skip], dim=1) if self.skips else up(y))
        return ((xp[:, :self.channels] if self.residual else 0) + self.head(y))[..., :h, :w]
