"""Loader throughput: patches/s of every available backend (torch with 1 and N workers).

    python -m data_pipeline.benchmark --data-root ../shared/data [--modes gray,rgb] [--workers 14]
    python -m data_pipeline.benchmark --modes rgb --dataset DIV2K_train_HR --tile 480 --cache-mb 0 --backends torch

Gray on Train400, RGB on the BSDS color set (train_color), or one --dataset of yours, q10-40, at
batch 32 x 64^2 and 64 x 128^2, across epoch boundaries; --tile prepares it in tiles, --cache-mb
sets the torch workers' cache of decoded images (0: a set larger than the cache). What a training step consumes beside these rates (the
headroom): `python -m train.benchmark --loaders --data-root ../shared/data`.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from .backends import backends
from .config import DataConfig
from .errors import UserError, command
from .images import atomic_write_json, check_output_file, output_file
from .loaders import build_loader
from .prepare import prepare, prepared_name
from .sources import dataset_dir


def loader_rates(cfg: DataConfig, batches: int, device: torch.device = torch.device("cpu"), repeats: int = 1) -> tuple[list[float], int]:
    """Patches/s of each of `repeats` consecutive windows of `batches` after a warm-up, and the
    loader's steps an epoch."""
    loader = build_loader(cfg, device=device)
    try:
        stream = itertools.chain.from_iterable(iter(loader) for _ in itertools.count())  # across epochs
        for _ in range(2):
            next(stream)  # warm-up: workers / pipeline start
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(batches):
                next(stream)
            rates.append(batches * cfg.batch_size / (time.perf_counter() - start))
        return rates, len(loader)
    finally:
        loader.close()


SHAPES = ((32, 64), (64, 128))  # (batch, patch)
DATASETS = {"gray": "train400", "rgb": "train_color"}


def variants(workers: int = 2, only: list[str] | None = None) -> list[tuple[str, int]]:
    """(backend, workers) for every available backend (or those of `only`); the torch backend with 1
    and `workers` workers."""
    unknown = set(only or ()) - set(backends())
    if unknown:
        raise ValueError(f"unknown loader backend(s) {', '.join(sorted(unknown))}: choose from {', '.join(backends())}")
    out = []
    for name, cls in backends().items():
        if cls.unavailable() is None and (only is None or name in only):
            torch_workers = sorted({1, workers})
            out += [(name, w) for w in (torch_workers if name == "torch" else (workers,) if name == "dali" else (0,))]
    return out


def measure(prepared: Path, batches: int, device: torch.device, shapes=SHAPES, workers: int = 2, mode: str = "gray",
            qualities=(10, 20, 30, 40), only: list[str] | None = None, cache_mb: int = DataConfig.cache_mb,
            repeats: int = 1) -> list[dict]:
    """A row per shape and variant: the median patches/s of `repeats` windows of `batches`, and
    their lowest and highest (a shared machine's neighbours move single figures by 2x)."""
    rows = []
    for batch, patch in shapes:
        for backend, w in variants(workers, only):
            cfg = DataConfig(backend=backend, prepared_dir=str(prepared), mode=mode, patch_size=patch, batch_size=batch,
                             workers=w, qualities=list(qualities), cache_mb=cache_mb)
            rates, steps = loader_rates(cfg, batches, device, repeats)
            rows.append({"backend": backend, "workers": w, "mode": mode, "batch": batch, "patch": patch,
                         "patches_per_s": statistics.median(rates), "patches_per_s_range": [min(rates), max(rates)],
                         "steps_per_epoch": steps})
    return rows


def check_datasets(data_root: str | None, modes: list[str], dataset: str | None = None) -> None:
    """Every mode's dataset is there: a missing one is said before minutes of measuring the others."""
    for mode in modes:
        dataset_dir(dataset or DATASETS[mode], data_root)


def prepare_dataset(data_root: str | None, mode: str, out_root: Path = Path("outputs/prepared"), dataset: str | None = None,
                    tile: int = 0) -> Path:
    """The benchmark's dataset of `mode` (or `dataset`), prepared at q10-40, in tiles of `tile` px
    if given (kept across runs)."""
    source = dataset_dir(dataset or DATASETS[mode], data_root)
    prepared = out_root / prepared_name(source, mode, tile)
    prepare(source, prepared, mode, [10, 20, 30, 40], progress=False, tile=tile)
    return prepared


@command
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root")
    ap.add_argument("--modes", default="gray", help="gray (Train400) and/or rgb (train_color), comma-separated")
    ap.add_argument("--workers", type=int, default=2, help="torch workers / DALI threads (the torch backend also runs with 1)")
    ap.add_argument("--batches", type=int, default=40, help="batches a measurement")
    ap.add_argument("--repeats", type=int, default=3, help="measurements of each loader, one after another: the median and the range are shown")
    ap.add_argument("--backends", help="comma-separated backends to measure (default: every available one)")
    ap.add_argument("--dataset", help="a dataset of yours (a folder name in the data root, or a path) instead of "
                                      "Train400 / the BSDS color set; one mode")
    ap.add_argument("--tile", type=int, default=0, help="prepare the training images in tiles of this side (0: whole)")
    ap.add_argument("--cache-mb", type=int, default=DataConfig.cache_mb,
                    help=f"each torch worker's cache of decoded images, MiB (default {DataConfig.cache_mb})")
    ap.add_argument("--json", type=output_file, default=Path("outputs/loader_bench.json"))
    args = ap.parse_args(argv)
    check_output_file(args.json, "--json", json_only=True)
    modes = args.modes.split(",")
    if not set(modes) <= set(DATASETS):
        raise UserError(f"--modes takes {', '.join(DATASETS)}, got {args.modes!r}")
    if min(args.workers, args.batches, args.repeats) < 1:
        raise UserError(f"--workers, --batches and --repeats must be at least 1, got {args.workers}, {args.batches} and {args.repeats}")
    if args.dataset and len(modes) > 1:
        raise UserError(f"--dataset is prepared in one mode: give --modes gray or --modes rgb, got {args.modes!r}")
    if args.cache_mb < 0 or args.tile < 0 or 0 < args.tile < max(patch for _, patch in SHAPES):
        raise UserError(f"--cache-mb must be 0 or more and --tile 0 or at least the largest patch, "
                        f"{max(patch for _, patch in SHAPES)}, got {args.cache_mb} and {args.tile}")
    only = args.backends.split(",") if args.backends else None
    try:
        variants(args.workers, only)  # unknown backend names fail here, before any data is prepared
    except ValueError as exc:
        raise UserError(str(exc)) from None
    check_datasets(args.data_root, modes, args.dataset)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    prepared = {mode: prepare_dataset(args.data_root, mode, dataset=args.dataset, tile=args.tile) for mode in modes}
    rows = [r for mode in modes for r in measure(prepared[mode], args.batches, device, workers=args.workers, mode=mode,
                                                 only=only, cache_mb=args.cache_mb, repeats=args.repeats)]
    print(f"{name} ({device}), {os.cpu_count()} cores, torch {torch.__version__}, q10-40, "
          + ", ".join(p.name for p in prepared.values()) + f", torch workers' cache {args.cache_mb} MiB")
    print(f"{'backend':<12} {'workers':>7} {'mode':>5} {'batch':>5} {'patch':>5} {'patches/s':>10} {f'range of {args.repeats}':>19}")
    short = [r["backend"] == "torch" and r["steps_per_epoch"] < r["workers"] for r in rows]
    for r, idle in zip(rows, short):
        low, high = r["patches_per_s_range"]
        print(f"{r['backend']:<12} {r['workers']:>7} {r['mode']:>5} {r['batch']:>5} {r['patch']:>5} {r['patches_per_s']:10.0f}"
              f" {f'{low:.0f}-{high:.0f}':>19}{' *' if idle else ''}")
    if any(short):
        print("* an epoch has fewer batches than workers: the torch loader keeps only that many busy")
    atomic_write_json(args.json, {"device": str(device), "device_name": name, "cpu_count": os.cpu_count(),
                                  "torch": torch.__version__, "prepared": {m: str(p) for m, p in prepared.items()},
                                  "tile": args.tile, "cache_mb": args.cache_mb, "batches": args.batches, "repeats": args.repeats,
                                  "rows": rows})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
