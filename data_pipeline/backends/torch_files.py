"""PyTorch Dataset + DataLoader + DistributedSampler over the prepared files (Pillow decodes)."""
from __future__ import annotations

import itertools
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..images import decode_jpeg, jpeg_bytes
from ..patches import crop_offset
from . import Backend, register_backend


class PairDataset(Dataset):
    """Random (or centre) crops of (JPEG, original) pairs. A key is epoch * len + index, and the
    randomness a function of (seed, epoch, index), so persistent workers, any worker layout and a
    resumed run see the same samples. Each worker keeps the images it decoded (up to
    data.cache_mb), so a file is decoded once, not once per patch."""

    def __init__(self, pairs: list, cfg):
        self.pairs, self.cfg = pairs, cfg
        lo, hi = cfg.online_quality_range
        self.online_qualities = np.arange(lo, hi + 1)
        self.cache: dict[str, np.ndarray] = {}
        self.cached_bytes = 0

    def __len__(self):
        return len(self.pairs)

    def _read(self, path: str) -> np.ndarray:
        img = self.cache.get(path)
        if img is None:
            with Image.open(path) as im:
                img = np.asarray(im.convert("L" if self.cfg.mode == "gray" else "RGB"))
            if self.cached_bytes + img.nbytes <= self.cfg.cache_mb * 2**20:
                self.cache[path] = img
                self.cached_bytes += img.nbytes
        return img

    def __getitem__(self, key: int):
        cfg = self.cfg
        epoch, index = divmod(key, len(self.pairs))
        rng = np.random.default_rng([cfg.seed, epoch, index])
        u, v = rng.random(2) if cfg.augment else (0.5, 0.5)
        hflip, vflip, transpose = rng.integers(0, 2, 3) if cfg.augment else (0, 0, 0)
        jpeg_path, orig_path, quality = self.pairs[index]
        target = self._read(orig_path)
        p = cfg.patch_size
        y0 = crop_offset(u, target.shape[0], p, cfg.crop_align)
        x0 = crop_offset(v, target.shape[1], p, cfg.crop_align)
        target = target[y0:y0 + p, x0:x0 + p]
        if jpeg_path is None:
            quality = int(rng.choice(self.online_qualities))
            inp = decode_jpeg(jpeg_bytes(np.ascontiguousarray(target), quality))
        else:
            inp = self._read(jpeg_path)[y0:y0 + p, x0:x0 + p]
        out = []
        for a in (inp, target):
            a = a if a.ndim == 3 else a[:, :, None]
            if hflip:
                a = a[:, ::-1]
            if vflip:
                a = a[::-1]
            if transpose:
                a = a.transpose(1, 0, 2)
            out.append(torch.from_numpy(a.transpose(2, 0, 1).copy()))
        if cfg.quality_plane:  # the JPEG quality as uint8, 0 for the blind share (drawn last: other draws unchanged)
            value = 0 if rng.random() < cfg.blind_fraction else quality
            out[0] = torch.cat([out[0], torch.full((1, p, p), value, dtype=torch.uint8)])
        return out[0], out[1]


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start part-way into an epoch (resume) and tells the dataset
    the epoch through the key (epoch * len + index), which persistent workers need."""
    start = 0

    def __iter__(self):
        n = len(self.dataset)
        return (self.epoch * n + i for i in itertools.islice(super().__iter__(), self.start, None))

    def __len__(self):
        return super().__len__() - self.start


@register_backend("torch", order=20)
class TorchSource(Backend):
    """Dataset + DataLoader + DistributedSampler; exact resume (randomness from (seed, epoch, index))."""

    def __init__(self, pairs, cfg, rank: int, world_size: int, device: torch.device):
        self.dataset = PairDataset(pairs, cfg)
        self.sampler = ResumableSampler(self.dataset, num_replicas=world_size, rank=rank,
                                          shuffle=cfg.augment, seed=cfg.seed, drop_last=True)
        workers = dict(persistent_workers=True, prefetch_factor=4) if cfg.workers > 0 else {}
        self.loader = DataLoader(self.dataset, batch_size=cfg.batch_size, sampler=self.sampler,
                                 num_workers=cfg.workers, pin_memory=device.type == "cuda", drop_last=True,
                                 generator=torch.Generator().manual_seed(cfg.seed), **workers)  # leaves the global RNG alone

    def batches(self, epoch: int, start: int = 0) -> Iterator:
        self.sampler.set_epoch(epoch)
        self.sampler.start = start * self.loader.batch_size
        yield from self.loader

    def close(self) -> None:
        # the persistent workers end now, as PyTorch Lightning ends them: left to the garbage collector (a
        # Trainer sits in reference cycles), they took 5 s each to end, at whatever line it ran (0.01 s here)
        iterator, self.loader._iterator = getattr(self.loader, "_iterator", None), None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
