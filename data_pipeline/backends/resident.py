"""Device-resident backend: every prepared image is decoded once and kept as uint8 on the training
device (GPU memory on CUDA, host memory on CPU): the original and the JPEG input of every
configured quality, each image flattened (HWC) into one buffer. A batch is one gather: crop
offsets, flips, transposes and the (image, quality) pairs are drawn for a whole epoch at once, as
tensors, and turned into one index tensor, with no per-sample Python and no worker processes.

Randomness is a function of (seed, epoch) only (a permutation of the pairs and each pair's crop
and flips), so any rank count sees the same samples, each rank gets an equal share, and a resumed
run continues exactly. `data.resident_mb` bounds the memory; the error names the size needed."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from PIL import Image

from ..sources import DataError
from . import Backend, register_backend


def _decode(path: str, mode: str) -> np.ndarray:
    with Image.open(path) as im:
        a = np.array(im.convert("L" if mode == "gray" else "RGB"))  # writable: torch.from_numpy takes it
    return a[..., None] if a.ndim == 2 else a


def _size(path: str) -> tuple[int, int]:
    with Image.open(path) as im:  # (w, h) from the header, no decoding
        return im.size


def _originals_and_sizes(pairs) -> tuple[list[str], list[tuple[int, int]]]:
    originals = list(dict.fromkeys(o for _, o, _ in pairs))  # in order, once each
    return originals, [_size(o) for o in originals]


@register_backend("resident", order=5)
class ResidentSource(Backend):
    """`auto` picks it for prepared data that fits data.resident_mb."""

    @classmethod
    def unfit(cls, pairs, cfg) -> str | None:
        if cfg.online:
            return "online mode makes its inputs on the fly"
        need_mb = cls.need_mb(_originals_and_sizes(pairs)[1], cfg)
        return f"needs {need_mb:.0f} MiB > data.resident_mb {cfg.resident_mb}" if need_mb > cfg.resident_mb else None

    @staticmethod
    def need_mb(sizes, cfg) -> float:
        return sum(w * h for w, h in sizes) * cfg.channels * (1 + len(cfg.qualities)) / 2**20

    def __init__(self, pairs, cfg, rank: int, world_size: int, device: torch.device):
        if cfg.online:
            raise DataError("data.backend='resident' needs prepared JPEGs (data.online = false); "
                            "prepare every quality you train on, e.g. data.qualities = [5, 10, ..., 95]")
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        originals, sizes = _originals_and_sizes(pairs)
        jpegs = {(o, i % len(cfg.qualities)): j for i, (j, o, _) in enumerate(pairs)}
        c = cfg.channels
        pixels = sum(w * h for w, h in sizes) * c
        versions = 1 + len(cfg.qualities)
        need_mb = self.need_mb(sizes, cfg)
        if need_mb > cfg.resident_mb:
            raise DataError(f"data.backend='resident' needs {need_mb:.0f} MiB for {len(originals)} images x "
                            f"{versions} versions (original + {len(cfg.qualities)} qualities); data.resident_mb is "
                            f"{cfg.resident_mb}: raise it or use the torch backend")
        buffer = torch.empty(versions * pixels, dtype=torch.uint8)
        offsets, at = [], 0
        for o, (w, h) in zip(originals, sizes):
            offsets.append(at)
            for v in range(versions):
                path = o if v == 0 else jpegs[(o, v - 1)]
                buffer[v * pixels + at: v * pixels + at + h * w * c] = torch.from_numpy(_decode(path, cfg.mode).reshape(-1))
            at += h * w * c
        self.buffer = buffer.to(device) if device.type == "cuda" else buffer
        self.pixels, self.channels = pixels, c
        self.offset = torch.tensor(offsets, dtype=torch.int64, device=device)
        self.height = torch.tensor([h for _, h in sizes], dtype=torch.int64, device=device)
        self.width = torch.tensor([w for w, _ in sizes], dtype=torch.int64, device=device)
        self.n_images, self.n_qualities = len(originals), len(cfg.qualities)
        self.n_pairs = self.n_images * self.n_qualities
        self.steps = (self.n_pairs // world_size) // cfg.batch_size
        p = cfg.patch_size
        ry, rx = torch.meshgrid(torch.arange(p, device=device), torch.arange(p, device=device), indexing="ij")
        self.ry, self.rx = ry.reshape(1, p, p), rx.reshape(1, p, p)
        self.rc = torch.arange(c, device=device).reshape(1, 1, 1, c)
        self.qualities = torch.tensor(cfg.qualities, dtype=torch.int64, device=device)

    def _epoch_plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's pairs for the epoch and every pair's (u, v, hflip, vflip, transpose)."""
        cfg = self.cfg
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n_pairs, generator=g) if cfg.augment else torch.arange(self.n_pairs)
        draws = torch.rand(self.n_pairs, 6, generator=g, dtype=torch.float32)  # u, v, 3 flips, blind
        if not cfg.augment:
            draws = torch.cat([torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0]).expand(self.n_pairs, 5), draws[:, 5:]], dim=1)
        mine = order[self.rank::self.world_size][: self.steps * cfg.batch_size]
        return mine.to(self.device), draws.to(self.device)

    def gather(self, pair: torch.Tensor, draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (input, target) batches, NCHW, for pair ids (image * Q + quality) and their draws."""
        cfg, p = self.cfg, self.cfg.patch_size
        image, quality = pair // self.n_qualities, pair % self.n_qualities
        h, w = self.height[image], self.width[image]
        d = draws[pair]
        # the crop rule of patches.crop_offset, in float32 as there: floor(u * (S - P) / align) * align
        y0 = torch.floor(d[:, 0] * (h - p).float() / cfg.crop_align).long() * cfg.crop_align
        x0 = torch.floor(d[:, 1] * (w - p).float() / cfg.crop_align).long() * cfg.crop_align
        hflip, vflip, transpose = (d[:, 2:5] < 0.5).unbind(1) if cfg.augment else (torch.zeros_like(image, dtype=torch.bool),) * 3
        t = transpose[:, None, None]  # as the torch backend: flips, then transpose, of the patch
        ry, rx = torch.where(t, self.rx, self.ry), torch.where(t, self.ry, self.rx)
        ry = torch.where(vflip[:, None, None], p - 1 - ry, ry)
        rx = torch.where(hflip[:, None, None], p - 1 - rx, rx)
        pixel = self.offset[:, None, None][image] + ((y0[:, None, None] + ry) * w[:, None, None] + x0[:, None, None] + rx) * self.channels
        index = pixel[..., None] + self.rc  # B x P x P x C
        target = self.buffer[index]
        inp = self.buffer[index + (1 + quality).reshape(-1, 1, 1, 1) * self.pixels].permute(0, 3, 1, 2)
        if cfg.quality_plane:  # the JPEG quality as uint8, 0 for the blind share
            value = torch.where(d[:, 5] < cfg.blind_fraction, 0, self.qualities[quality]).to(torch.uint8)
            inp = torch.cat([inp, value.reshape(-1, 1, 1, 1).expand(-1, 1, p, p)], dim=1)
        return inp, target.permute(0, 3, 1, 2)

    def batches(self, epoch: int, start: int = 0) -> Iterator:
        b = self.cfg.batch_size
        while True:
            mine, draws = self._epoch_plan(epoch)
            for step in range(start, self.steps):
                yield self.gather(mine[step * b:(step + 1) * b], draws)
            epoch, start = epoch + 1, 0
