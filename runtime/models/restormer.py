"""Restormer-style transformer (Zamir et al., CVPR 2022) at one scale: multi-Dconv-head
transposed attention (attention across channels, so its cost is linear in the pixels and any
image size works) and a gated-Dconv feed-forward network, with a global residual."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import register
from .common import zero_init_
from .nafnet import LayerNorm2d


class TransposedAttention(nn.Module):
    def __init__(self, c: int, heads: int):
        super().__init__()
        if heads < 1 or c % heads:
            raise ValueError(f"restormer: heads must be at least 1 and divide the width {c}, got {heads}")
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Sequential(nn.Conv2d(c, 3 * c, 1), nn.Conv2d(3 * c, 3 * c, 3, padding=1, groups=3 * c))
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        n, c, h, w = x.shape
        q, k, v = (t.reshape(n, self.heads, c // self.heads, h * w) for t in self.qkv(x).chunk(3, dim=1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)  # (c/heads)^2 per head
        return self.proj((attn @ v).reshape(n, c, h, w))


class GatedFFN(nn.Module):
    def __init__(self, c: int, expansion: float):
        super().__init__()
        hidden = int(c * expansion)
        self.inp = nn.Sequential(nn.Conv2d(c, 2 * hidden, 1), nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden))
        self.out = nn.Conv2d(hidden, c, 1)

    def forward(self, x):
        a, b = self.inp(x).chunk(2, dim=1)
        return self.out(F.gelu(a) * b)


class TransformerBlock(nn.Module):
    def __init__(self, c: int, heads: int, expansion: float):
        super().__init__()
        self.norm1, self.attn = LayerNorm2d(c), TransposedAttention(c, heads)
        self.norm2, self.ffn = LayerNorm2d(c), GatedFFN(c, expansion)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


@register("restormer", tiny={"width": 8, "blocks": 1, "heads": 2})
class Restormer(nn.Module):
    def __init__(self, channels: int = 1, width: int = 48, blocks: int = 6, heads: int = 4, expansion: float = 2.66):
        super().__init__()
        self.head = nn.Conv2d(channels, width, 3, padding=1)
        self.body = nn.Sequential(*[TransformerBlock(width, heads, expansion) for _ in range(blocks)])
        self.tail = zero_init_(nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.tail(self.body(self.head(x)))
