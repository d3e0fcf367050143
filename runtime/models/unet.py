"""U-Net: encoder-decoder with skip connections (concatenation) and a global residual
(`skips=False`, `residual=False` and `dropout` exist for ablations). `unshuffle=r` puts a
pixel-unshuffle stem in front (FFDNet's): the network runs on the r x r sub-images, r² channels a
plane at 1/r the resolution, and a pixel shuffle puts its output back (at r = 2 twice the width
costs the plain U-Net's MACs, with twice its receptive field; it lost to it: docs/experiments.md).
Told the quality (`cond_channels`), it reads the quality planes as extra input channels, or with
`film=True` as a FiLM modulation of every block's output (the planes are constant: their mean is
the quality)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import register
from .common import FiLMStack, activation, modulate, pad_to_multiple, zero_init_


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
                 skips: bool = True, residual: bool = True, dropout: float = 0.0, cond_channels: int = 0, film: bool = False, unshuffle: int = 1):
        super().__init__()
        if levels < 1:
            raise ValueError(f"unet: levels must be at least 1, got {levels}")
        if unshuffle < 1:
            raise ValueError(f"unet: unshuffle must be at least 1, got {unshuffle}")
        self.levels, self.skips, self.residual, self.channels, self.unshuffle = levels, skips, residual, channels, unshuffle
        widths = [width * 2**i for i in range(levels + 1)]
        c_in = (channels + (0 if film else cond_channels)) * unshuffle**2
        self.down = nn.ModuleList([_block(c_in if i == 0 else widths[i - 1], widths[i], act, batch_norm)
                                   for i in range(levels)])
        self.pool = nn.MaxPool2d(2)
        self.bottom = _block(widths[levels - 1], widths[levels], act, batch_norm)
        self.dropout = nn.Dropout2d(dropout)  # on the bottleneck features, training only
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(levels))])
        self.merge = nn.ModuleList([_block((2 if skips else 1) * widths[i], widths[i], act, batch_norm)
                                    for i in reversed(range(levels))])
        self.head = nn.Conv2d(width, channels * unshuffle**2, 1)
        # one FiLM per block, in the order forward runs them: down blocks, bottom, merges
        self.film = FiLMStack(cond_channels, widths + widths[levels - 1::-1]) if film else None
        if residual:
            zero_init_(self.head)

    @property
    def size_multiple(self) -> int:
        """Height and width are padded to a multiple of this inside forward (compiled exports take it as given)."""
        return self.unshuffle * 2**self.levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp, (h, w) = pad_to_multiple(x, self.size_multiple)
        y, quality = FiLMStack.split(xp, self.channels) if self.film is not None else (xp, None)
        y = F.pixel_unshuffle(y, self.unshuffle) if self.unshuffle > 1 else y
        skips = []
        for i, block in enumerate(self.down):
            y = modulate(self.film, i, block(y), quality)
            skips.append(y)
            y = self.pool(y)
        y = self.dropout(modulate(self.film, self.levels, self.bottom(y), quality))
        for i, (up, merge, skip) in enumerate(zip(self.up, self.merge, reversed(skips))):
            y = modulate(self.film, self.levels + 1 + i, merge(torch.cat([up(y), skip], dim=1) if self.skips else up(y)), quality)
        y = F.pixel_shuffle(self.head(y), self.unshuffle) if self.unshuffle > 1 else self.head(y)
        return ((xp[:, :self.channels] if self.residual else 0) + y)[..., :h, :w]
