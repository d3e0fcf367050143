"""One factory for training/validation batches: `build_loader(cfg, rank, world_size)`.

Every backend yields pairs (jpeg_input, original) as float32 NCHW tensors in [0, 1] on the
training device, with the same number of batches per epoch on every rank (so DDP never hangs).
Backends: 'dali' (nvJPEG on GPU, CPU pipeline otherwise), 'torch' (DataLoader +
DistributedSampler) and 'synthetic' (fixed random tensors, for throughput benchmarks).
"""
from __future__ import annotations

import importlib.util
import itertools
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .config import DataConfig
from .images import decode_jpeg, jpeg_bytes
from .prepare import load_manifest
from .sources import DataError

log = logging.getLogger(__name__)

Pair = tuple[str | None, str]  # (jpeg path or None for online mode, original path)


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def resolve_backend(name: str) -> str:
    if name == "auto":
        return "dali" if dali_available() else "torch"
    if name == "dali" and not dali_available():
        raise DataError("data.backend='dali' but NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
    return name


def training_pairs(cfg: DataConfig, split: str = "train") -> list[Pair]:
    """The (input, target) files of one split of the prepared dataset, in a fixed order."""
    root = Path(cfg.prepared_dir)
    manifest = load_manifest(root)
    if manifest["mode"] != cfg.mode:
        raise DataError(f"{root} was prepared in {manifest['mode']} mode, the config asks for {cfg.mode}")
    files = [f for f in manifest["files"] if f["split"] == split][:cfg.limit or None]
    if not files:
        raise DataError(f"{root}: the {split!r} split is empty (raise data.val_fraction or add images)")
    smallest = min(min(f["height"], f["width"]) for f in files)
    if smallest < cfg.patch_size:
        raise DataError(f"{root}: smallest image side {smallest} < data.patch_size {cfg.patch_size}")
    original = [str(root / f["original"]["path"]) for f in files]
    if cfg.online:
        return [(None, o) for o in original]
    missing = sorted(set(cfg.qualities) - set(manifest["qualities"]))
    if missing:
        raise DataError(f"{root} has no JPEGs at qualities {missing}: re-run prepare with them")
    return [(str(root / f["jpeg"][str(q)]["path"]), o) for f, o in zip(files, original) for q in cfg.qualities]


def crop_offset(u: float, size: int, patch: int, align: int) -> int:
    """Offset of a crop for a uniform draw u in [0, 1); DALI's pipeline uses the same formula."""
    return int(np.floor(np.float32(u) * np.float32(size - patch) / np.float32(align))) * align


class PairDataset(Dataset):
    """Random (or centre) crops of (JPEG, original) pairs; randomness is a function of
    (seed, epoch, index), so any worker layout and a resumed run see the same samples."""

    def __init__(self, pairs: list[Pair], cfg: DataConfig):
        self.pairs, self.cfg, self.epoch = pairs, cfg, 0
        lo, hi = cfg.online_quality_range
        self.online_qualities = np.arange(lo, hi + 1)

    def __len__(self):
        return len(self.pairs)

    def _read(self, path: str) -> np.ndarray:
        with Image.open(path) as im:
            return np.asarray(im.convert("L" if self.cfg.mode == "gray" else "RGB"))

    def __getitem__(self, index: int):
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, self.epoch, index])
        u, v = rng.random(2) if cfg.augment else (0.5, 0.5)
        hflip, vflip, transpose = rng.integers(0, 2, 3) if cfg.augment else (0, 0, 0)
        jpeg_path, orig_path = self.pairs[index]
        target = self._read(orig_path)
        p = cfg.patch_size
        y0 = crop_offset(u, target.shape[0], p, cfg.crop_align)
        x0 = crop_offset(v, target.shape[1], p, cfg.crop_align)
        target = target[y0:y0 + p, x0:x0 + p]
        if jpeg_path is None:
            inp = decode_jpeg(jpeg_bytes(np.ascontiguousarray(target), rng.choice(self.online_qualities)))
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
        return out[0], out[1]


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start part-way into an epoch (resume)."""
    start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return super().__len__() - self.start


class TorchSource:
    def __init__(self, pairs, cfg: DataConfig, rank: int, world_size: int, device: torch.device):
        self.dataset = PairDataset(pairs, cfg)
        self.sampler = ResumableSampler(self.dataset, num_replicas=world_size, rank=rank,
                                          shuffle=cfg.augment, seed=cfg.seed, drop_last=True)
        self.loader = DataLoader(self.dataset, batch_size=cfg.batch_size, sampler=self.sampler,
                                 num_workers=cfg.workers, pin_memory=device.type == "cuda", drop_last=True,
                                 generator=torch.Generator().manual_seed(cfg.seed))  # leaves the global RNG alone

    def batches(self, epoch: int, start: int = 0) -> Iterator:
        self.sampler.set_epoch(epoch)
        self.sampler.start = start * self.loader.batch_size
        self.dataset.epoch = epoch  # workers are started per epoch, so they see it
        yield from self.loader


class SyntheticSource:
    """One fixed random batch, already on the device: measures compute, not data."""

    def __init__(self, cfg: DataConfig, device: torch.device):
        g = torch.Generator().manual_seed(cfg.seed)
        shape = (cfg.batch_size, cfg.channels, cfg.patch_size, cfg.patch_size)
        target = torch.rand(shape, generator=g)
        noisy = (target + 0.05 * torch.randn(shape, generator=g)).clamp_(0, 1)
        self.batch = (noisy.to(device), target.to(device))

    def batches(self, epoch: int, start: int = 0) -> Iterator:
        while True:
            yield self.batch


class PairLoader:
    """Iterating yields one epoch of `steps_per_epoch` float batches on `device`."""

    def __init__(self, source, steps_per_epoch: int, device: torch.device, backend: str):
        self.source, self.steps_per_epoch, self.device, self.backend = source, steps_per_epoch, device, backend
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The next iteration yields batches `start`.. of `epoch` (start > 0 when resuming)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device, non_blocking=True)
        return t if t.is_floating_point() else t.float().div_(255)

    def __iter__(self):
        batches = self.source.batches(self.epoch, self.start)
        for _ in range(self.start, self.steps_per_epoch):
            inp, target = next(batches)
            yield self._to_device(inp), self._to_device(target)


def build_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 split: str = "train") -> PairLoader:
    device = torch.device(device)
    backend = resolve_backend(cfg.backend)
    if backend == "synthetic":
        return PairLoader(SyntheticSource(cfg, device), 10**9, device, backend)
    pairs = training_pairs(cfg, split)
    steps = (len(pairs) // world_size) // cfg.batch_size
    if steps < 1:
        raise DataError(f"{len(pairs)} {split} pairs are too few for batch {cfg.batch_size} x {world_size} ranks")
    if backend == "dali":
        from .dali_backend import DaliSource

        source = DaliSource(pairs, cfg, rank, world_size, device)
    else:
        source = TorchSource(pairs, cfg, rank, world_size, device)
    log.info("loader %s: %d %s pairs, %d steps/epoch on rank %d/%d", backend, len(pairs), split, steps, rank, world_size)
    return PairLoader(source, steps, device, backend)
