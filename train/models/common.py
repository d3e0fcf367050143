"""Helpers shared by architectures: padding to a multiple, activations, tiled inference."""
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


def _starts(size: int, tile: int, stride: int) -> list[int]:
    starts = list(range(0, max(size - tile, 0) + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def tiled_forward(fn, x: torch.Tensor, tile: int, overlap: int, max_tiles: int = 64) -> torch.Tensor:
    """Apply a fixed-size model `fn` (tile x tile) to any image: overlapping tiles, blended with
    weights that ramp down towards tile edges, at most `max_tiles` tiles per call."""
    h, w = x.shape[-2:]
    x = F.pad(x, (0, max(0, tile - w), 0, max(0, tile - h)), mode="replicate")  # images smaller than a tile
    n, c, H, W = x.shape
    ys, xs = _starts(H, tile, tile - overlap), _starts(W, tile, tile - overlap)
    ramp = torch.arange(tile, device=x.device, dtype=torch.float32)
    ramp = torch.minimum(ramp + 1, tile - ramp).clamp(max=max(overlap, 1)) / max(overlap, 1)
    weight = (ramp[:, None] * ramp[None, :])[None, None]
    out = torch.zeros(n, c, H, W, device=x.device, dtype=torch.float32)
    norm = torch.zeros(1, 1, H, W, device=x.device, dtype=torch.float32)
    coords = [(y0, x0) for y0 in ys for x0 in xs]
    for i in range(0, len(coords), max(1, max_tiles // n)):
        chunk = coords[i:i + max(1, max_tiles // n)]
        tiles = torch.cat([x[:, :, y0:y0 + tile, x0:x0 + tile] for y0, x0 in chunk])
        res = fn(tiles).float().view(len(chunk), n, c, tile, tile)
        for (y0, x0), r in zip(chunk, res):
            out[:, :, y0:y0 + tile, x0:x0 + tile] += r * weight
            norm[:, :, y0:y0 + tile, x0:x0 + tile] += weight
    return (out / norm)[:, :, :h, :w].to(x.dtype)

