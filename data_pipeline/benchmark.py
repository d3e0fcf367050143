"""Loader throughput: patches/s of every available backend (torch with 1 and 2 workers).

    python -m data_pipeline.benchmark --data-root ../shared/data [--json outputs/loader_bench.json]

On Train400 at 64x64 and 128x128 patches, batch 32. What a training step consumes beside these
rates (the headroom): `python -m train.benchmark --loaders --data-root ../shared/data`.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import torch

from .backends import backends
from .config import DataConfig
from .errors import command
from .images import atomic_write_json
from .loaders import build_loader
from .prepare import prepare
from .sources import dataset_dir


def loader_rate(cfg: DataConfig, batches: int, device: torch.device = torch.device("cpu")) -> float:
    loader = build_loader(cfg, device=device)
    stream = itertools.chain.from_iterable(iter(loader) for _ in itertools.count())  # across epochs
    for _ in range(2):
        next(stream)  # warm-up: workers / pipeline start
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * cfg.batch_size / (time.perf_counter() - start)


def variants() -> list[tuple[str, int]]:
    """(backend, workers) for every available backend; the torch backend with 1 and 2 workers."""
    out = []
    for name, cls in backends().items():
        if cls.unavailable() is None:
            out += [(name, w) for w in ((1, 2) if name == "torch" else (2,) if cls.needs_files else (0,))]
    return out


def measure(prepared: Path, batches: int, device: torch.device, patches=(64, 128)) -> list[dict]:
    rows = []
    for patch in patches:
        for backend, workers in variants():
            cfg = DataConfig(backend=backend, prepared_dir=str(prepared), patch_size=patch, batch_size=32, workers=workers)
            rows.append({"backend": backend, "workers": workers, "patch": patch,
                         "patches_per_s": loader_rate(cfg, batches, device)})
    return rows


def prepare_train400(data_root: str | None, prepared: Path) -> Path:
    prepare(dataset_dir("train400", data_root), prepared, "gray", [10, 20, 30, 40], progress=False)
    return prepared


@command
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root")
    ap.add_argument("--prepared", type=Path, default=Path("outputs/prepared/train400-gray"))
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--json", type=Path, default=Path("outputs/loader_bench.json"))
    args = ap.parse_args(argv)
    prepare_train400(args.data_root, args.prepared)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = measure(args.prepared, args.batches, device)
    print(f"device {device}, {os.cpu_count()} cores, torch {torch.__version__}, batch 32, Train400 q10-40")
    print(f"{'backend':<12} {'workers':>7} {'patch':>5} {'patches/s':>10}")
    for r in rows:
        print(f"{r['backend']:<12} {r['workers']:>7} {r['patch']:>5} {r['patches_per_s']:10.0f}")
    atomic_write_json(args.json, {"device": str(device), "cpu_count": os.cpu_count(), "torch": torch.__version__, "rows": rows})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
