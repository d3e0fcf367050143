"""Loader throughput against what training consumes.

    python -m data_pipeline.benchmark --data-root ../shared/data [--json outputs/loader_bench.json]

Measures patches/s of each backend (dali, torch with 1 and 2 workers, synthetic) on Train400
at 64x64 and 128x128 patches, batch 32, and the patches/s a DnCNN-17 training step consumes
on this device (train.precision auto: bf16 autocast where native, else fp32; channels_last); prints the table and the headroom ratios.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

from train.benchmark import bare_loop_rate
from train.inference import resolve_precision

from .config import DataConfig
from .images import atomic_write_json
from .loaders import build_loader, dali_available
from .prepare import prepare
from .sources import DataError, dataset_dir


def loader_rate(cfg: DataConfig, batches: int) -> float:
    loader = build_loader(cfg)
    stream = itertools.chain.from_iterable(iter(loader) for _ in itertools.count())  # across epochs
    for _ in range(2):
        next(stream)  # warm-up: workers / pipeline start
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * cfg.batch_size / (time.perf_counter() - start)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root")
    ap.add_argument("--prepared", type=Path, default=Path("outputs/prepared/train400-gray"))
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--json", type=Path, default=Path("outputs/loader_bench.json"))
    args = ap.parse_args(argv)
    try:
        prepare(dataset_dir("train400", args.data_root), args.prepared, "gray", [10, 20, 30, 40], progress=False)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    variants = [("dali", 2)] * dali_available() + [("torch", 1), ("torch", 2), ("synthetic", 0)]
    rows = []
    for patch in (64, 128):
        consumed = bare_loop_rate("dncnn", args.train_steps, device, batch=32, patch=patch)
        rows.append({"backend": f"DnCNN-17 train step ({resolve_precision('auto', device)})", "workers": 0, "patch": patch, "patches_per_s": consumed})
        for backend, workers in variants:
            cfg = DataConfig(backend=backend, prepared_dir=str(args.prepared), patch_size=patch, batch_size=32,
                             workers=workers)
            rate = loader_rate(cfg, args.batches)
            rows.append({"backend": backend, "workers": workers, "patch": patch, "patches_per_s": rate,
                         "x_training": rate / consumed})
    print(f"device {device}, {os.cpu_count()} cores, torch {torch.__version__}, batch 32, Train400 q10-40")
    print(f"{'backend':<28} {'workers':>7} {'patch':>5} {'patches/s':>10} {'x training':>10}")
    for r in rows:
        ratio = f"{r['x_training']:10.1f}" if "x_training" in r else f"{'':>10}"
        print(f"{r['backend']:<28} {r['workers']:>7} {r['patch']:>5} {r['patches_per_s']:10.0f} {ratio}")
    for patch in (64, 128):
        by = {(r["backend"], r["workers"]): r["patches_per_s"] for r in rows if r["patch"] == patch}
        if ("dali", 2) in by:
            print(f"dali / torch at 2 workers, {patch}x{patch}: {by[('dali', 2)] / by[('torch', 2)]:.2f}x")
    atomic_write_json(args.json, {"device": str(device), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                                  "rows": rows})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
