"""One factory for training/validation batches: `build_loader(cfg, rank, world_size, device)`.

Every backend (data_pipeline/backends/, one file each) yields pairs (jpeg_input, original); the
loader hands them on as float32 NCHW tensors in [0, 1] on the training device, with the same
number of batches per epoch on every rank (so DDP never hangs).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image

from .backends import backends
from .errors import some
from .prepare import SPLIT_NAMES, check_files, load_manifest, parts, split_records
from .sources import DataError, refuse_test_set
from .system import usable_cpus

log = logging.getLogger(__name__)
WORKERS_PER_CPU = 4  # data.workers beyond this only compete (100000 spawned workers for ten minutes)
LARGE_FILE_MP = 1.0  # files this large (7x a BSDS photo) make the torch and DALI loaders decode-bound

Pair = tuple[str | None, str, int]  # (jpeg path or None for online mode, original path, quality or 0 online)


def dali_available() -> bool:
    return backends()["dali"].unavailable() is None


def backend_choices() -> list[str]:
    return ["auto", *backends()]


def resolve_backend(name: str, pairs=(), cfg=None) -> str:
    """'auto' -> the first available backend that suits the pairs: resident when the prepared data
    fits data.resident_mb, else dali (gray only), else torch. Others are checked."""
    found = backends()
    if name == "auto":
        for n, cls in found.items():
            if cls.auto and cls.unavailable() is None:
                why = cls.unfit(pairs, cfg) if cfg is not None else None
                if why is None:
                    return n
                log.info("loader auto: not %s (%s)", n, why)
    if name not in found:
        raise DataError(f"data.backend must be one of {', '.join(backend_choices())}, got {name!r}")
    why = found[name].unavailable()
    if why:
        raise DataError(f"data.backend={name!r} cannot run here: {why}")
    return name


def _mean_megapixels(pairs: list[Pair], sample: int = 64) -> float:
    """Mean size of the pairs' originals, from the headers of up to `sample` of them."""
    originals = list(dict.fromkeys(o for _, o, _ in pairs))
    sizes = []
    for path in originals[::max(1, len(originals) // sample)]:
        try:
            with Image.open(path) as im:
                sizes.append(im.width * im.height)
        except OSError:  # damaged since it was checked: the batch that reads it names it
            pass
    return sum(sizes) / max(1, len(sizes)) / 1e6


def training_pairs(cfg, split: str = "train") -> list[Pair]:
    """The (input, target) files of one split of the prepared dataset, in a fixed order."""
    root = Path(cfg.prepared_dir)
    manifest = load_manifest(root)
    if manifest["mode"] != cfg.mode:
        raise DataError(f"{root} was prepared in {manifest['mode']} mode, the config asks for {cfg.mode}")
    refuse_test_set([Path(f"{f['name']}.png") for f in manifest["files"]], root)
    files = split_records(manifest, split, cfg.limit)
    if not files:
        fraction = "lower" if split == "train" else "raise"
        raise DataError(f"{root}: the {split!r} split is empty ({fraction} data.val_fraction or add images)")
    small = [f for f in files if max(min(p["height"], p["width"]) for p in parts(f)) < cfg.patch_size]  # no patch fits: passed over
    if len(small) == len(files):
        largest = max(min(p["height"], p["width"]) for f in files for p in parts(f))
        tiles = f" or tile (prepared in tiles of {manifest['tile_size']} px)" if manifest.get("tile_size") else ""
        raise DataError(f"{root}: every {SPLIT_NAMES[split]} image{tiles} is smaller than data.patch_size {cfg.patch_size} "
                        f"(the largest has {largest} px on its shorter side)")
    if small:
        log.warning("passed over %d %s image(s) smaller than data.patch_size %d: %s", len(small), SPLIT_NAMES[split],
                    cfg.patch_size, some([f"{f['source']} ({f['width']}x{f['height']})" for f in small]))
    files = [p for f in files for p in parts(f) if min(p["height"], p["width"]) >= cfg.patch_size]  # a tile too: one pair
    original = [str(root / f["original"]["path"]) for f in files]
    if cfg.online:
        check_files(root, manifest, files)
        return [(None, o, 0) for o in original]
    missing = sorted(set(cfg.qualities) - set(manifest["qualities"]))
    if missing:
        raise DataError(f"{root} has no JPEGs at qualities {missing}: re-run prepare with them")
    check_files(root, manifest, files, cfg.qualities)
    return [(str(root / f["jpeg"][str(q)]["path"]), o, q) for f, o in zip(files, original) for q in cfg.qualities]


class PairLoader:
    """Iterating yields one epoch of `steps_per_epoch` float batches on `device`."""

    def __init__(self, source, steps_per_epoch: int, device: torch.device, backend: str, recheck=lambda: None):
        self.source, self.steps_per_epoch, self.device, self.backend = source, steps_per_epoch, device, backend
        self.recheck = recheck  # the files checked again when a batch fails (DataError: a file changed)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The next iteration yields batches `start`.. of `epoch` (start > 0 when resuming)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.steps_per_epoch

    def close(self) -> None:
        self.source.close()

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device, non_blocking=True)
        return t if t.is_floating_point() else t.float().div_(255)

    def __iter__(self):
        batches = self.source.batches(self.epoch, self.start)
        for _ in range(self.start, self.steps_per_epoch):
            try:
                inp, target = next(batches)
            except Exception:  # a file changed during the run: named, with the command that mends it
                try:
                    self.recheck()
                except DataError as exc:
                    raise DataError(f"{exc}; then --resume continues the run") from None
                raise
            yield self._to_device(inp), self._to_device(target)


def build_loader(cfg, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 split: str = "train") -> PairLoader:
    device = torch.device(device)
    found = backends()
    if cfg.backend in found and not found[cfg.backend].needs_files:  # synthetic
        return PairLoader(found[cfg.backend]([], cfg, rank, world_size, device), 10**9, device, resolve_backend(cfg.backend))
    pairs = training_pairs(cfg, split)
    backend = resolve_backend(cfg.backend, pairs, cfg)
    cls = found[backend]
    steps = (len(pairs) // world_size) // cfg.batch_size
    if steps < 1:
        raise DataError(f"{len(pairs)} {split} pairs are too few for batch {cfg.batch_size} x {world_size} ranks")
    if cfg.workers > (cap := WORKERS_PER_CPU * usable_cpus()):  # each a process (torch) or a thread (DALI)
        raise DataError(f"data.workers {cfg.workers} is more than {cap}, {WORKERS_PER_CPU} for each of the "
                        f"{usable_cpus()} CPUs this process may use")
    source = cls(pairs, cfg, rank, world_size, device)
    log.info("loader %s: %d %s pairs, %d steps/epoch on rank %d/%d", backend, len(pairs), split, steps, rank, world_size)
    if backend in ("torch", "dali") and (megapixels := _mean_megapixels(pairs)) >= LARGE_FILE_MP:
        log.warning("the %s loader decodes a whole file for every patch, and these average %.1f MP: prepared in tiles "
                    "(data.tile_size = 480) it decodes a tile instead, 12x the patches/s on 2040x1356 photos", backend, megapixels)
    return PairLoader(source, steps, device, backend, recheck=lambda: training_pairs(cfg, split))
