"""Whole images of any size with bounded memory: overlapping tiles blended at the seams, and the
x8 geometric self-ensemble. Used by models with a fixed input size, validation, evaluation and runners."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

TILE, OVERLAP = 512, 32  # images larger than TILE run in overlapping tiles, one at a time
BLOCK = 8  # JPEG's block: tile starts (multiples of TILE - OVERLAP) stay on its grid


def _starts(size: int, tile: int, stride: int) -> list[int]:
    starts = list(range(0, max(size - tile, 0) + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def tile_count(h: int, w: int, tile: int = TILE, overlap: int = OVERLAP) -> int:
    """Tiles `restore_tensor` runs for an h x w image (1 when it fits in one tile)."""
    if max(h, w) <= tile:
        return 1
    h, w = (max(-(-s // BLOCK) * BLOCK, tile) for s in (h, w))  # as tiled_forward pads
    return len(_starts(h, tile, tile - overlap)) * len(_starts(w, tile, tile - overlap))


def tiled_forward(fn, x: torch.Tensor, tile: int, overlap: int, max_tiles: int = 64,
                  progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Apply a fixed-size model `fn` (tile x tile) to any image: overlapping tiles, blended with
    weights that ramp down towards tile edges, at most `max_tiles` tiles per call; `progress`
    is told how many tiles each call finished. The output may have fewer planes than the input
    (a quality plane goes in, only the image comes out)."""
    h, w = x.shape[-2:]
    x = pad_to_blocks(x)  # the last tile's start, size - tile, then stays on the 8x8 grid
    if min(x.shape[-2:]) < tile:  # a side smaller than a tile
        x = F.pad(x, (0, max(0, tile - x.shape[-1]), 0, max(0, tile - x.shape[-2])), mode="replicate")
    n, _, H, W = x.shape
    ys, xs = _starts(H, tile, tile - overlap), _starts(W, tile, tile - overlap)
    ramp = torch.arange(tile, device=x.device, dtype=torch.float32)
    ramp = torch.minimum(ramp + 1, tile - ramp).clamp(max=max(overlap, 1)) / max(overlap, 1)
    weight = (ramp[:, None] * ramp[None, :])[None, None]
    # the tiles form a grid: the weights summed over them are norm_y x norm_x, no image-sized buffer
    norm_y, norm_x = (torch.zeros(size, device=x.device) for size in (H, W))
    for norm, starts in ((norm_y, ys), (norm_x, xs)):
        for start in starts:
            norm[start:start + tile] += ramp
    out = None
    coords = [(y0, x0) for y0 in ys for x0 in xs]
    for i in range(0, len(coords), max(1, max_tiles // n)):
        chunk = coords[i:i + max(1, max_tiles // n)]
        tiles = torch.cat([x[:, :, y0:y0 + tile, x0:x0 + tile] for y0, x0 in chunk])
        res = fn(tiles).float()
        res = res.view(len(chunk), n, res.shape[1], tile, tile)
        if out is None:
            out = torch.zeros(n, res.shape[2], H, W, device=x.device, dtype=torch.float32)
        for (y0, x0), r in zip(chunk, res):
            out[:, :, y0:y0 + tile, x0:x0 + tile] += r * weight
        if progress is not None:
            progress(len(chunk))
    for y0 in range(0, H, tile):  # in place, a band at a time: the image's buffers are most of the memory
        out[:, :, y0:y0 + tile].div_(norm_y[y0:y0 + tile, None] * norm_x)
    return out[:, :, :h, :w].to(x.dtype)


def self_ensemble(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Mean of the model's outputs over the 8 rotations and flips of x, each turned back
    (geometric self-ensemble: 8x the compute, a small gain for free)."""
    total = 0
    for k in range(4):
        for flip in (False, True):
            t = torch.rot90(x, k, (-2, -1))
            y = model(t.flip(-1) if flip else t).float()
            total = total + torch.rot90(y.flip(-1) if flip else y, -k, (-2, -1))
    return total / 8


def pad_to_blocks(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """x padded at the bottom and right to whole JPEG blocks, repeating the edge as encoders do."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, -w % block, 0, -h % block), mode="replicate") if h % block or w % block else x


def restore_tensor(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int = TILE,
                   overlap: int = OVERLAP, ensemble: bool = False, tiles_per_call: int = 1,
                   progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """model(x) on an NCHW batch; images with a side above `tile` go in tiles, `tiles_per_call`
    at a time (memory grows with it); `ensemble` averages over the 8 rotations and flips of every tile.
    Tiles and turned views see JPEG's 8x8 grid where the model learned it (crops on the grid)."""
    fn = (lambda t: self_ensemble(model, t)) if ensemble else model
    h, w = x.shape[-2:]
    if max(h, w) <= tile and not ensemble:
        y = fn(x)
    elif max(h, w) <= tile:  # a flip of a width that is not whole blocks would move the grid
        y = fn(pad_to_blocks(x))[..., :h, :w]
    else:
        return tiled_forward(fn, x, tile, overlap, max_tiles=tiles_per_call * x.shape[0], progress=progress)
    if progress is not None:
        progress(1)
    return y
