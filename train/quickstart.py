"""The main job end to end on an embedded default: the natural photographs that ship inside
scikit-image (no download). Prepares them, runs every available loader backend, evaluates the
JPEG baseline and writes the table and side-by-side images.

    python -m train.quickstart [--out outputs/quickstart]
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path

from data_pipeline.config import DataConfig
from data_pipeline.images import atomic_write_bytes
from data_pipeline.loaders import build_loader, dali_available
from data_pipeline.prepare import prepare
from data_pipeline.sources import skimage_dir

from .evaluate import evaluate, format_table, load_test_images, write_side_by_side

QUALITIES = [10, 20, 30, 40]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("outputs/quickstart"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.out
    prepared = out / "prepared" / "skimage-gray"

    manifest = prepare(skimage_dir(), prepared, "gray", QUALITIES, val_fraction=0.2)
    print(f"prepared {len(manifest['files'])} scikit-image photographs into {prepared}")

    backends = ["dali"] * dali_available() + ["torch", "synthetic"]
    for backend in backends:
        cfg = DataConfig(backend=backend, prepared_dir=str(prepared), batch_size=8, patch_size=64)
        loader = build_loader(cfg)
        start, n = time.perf_counter(), 0
        for x, y in itertools.islice(loader, 20):
            n += x.shape[0]
        print(f"loader {backend:>9}: batches {tuple(x.shape)} in [{x.min():.2f}, {x.max():.2f}], "
              f"{n / (time.perf_counter() - start):.0f} patches/s")

    images, _ = load_test_images(prepared / "original")
    results, extra = evaluate(images, QUALITIES, keep=2)
    table = format_table(f"JPEG baseline on {len(images)} scikit-image photographs (gray)", results)
    print(table)
    atomic_write_bytes(out / "results.md", ("```\n" + table + "\n```\n").encode())
    atomic_write_bytes(out / "results.json", json.dumps({"dataset": "skimage", "results": results}, indent=2).encode())
    figures = write_side_by_side({10: extra["kept"][10]}, out / "side_by_side")
    print(f"wrote {out / 'results.md'} and {len(figures)} side-by-side images in {out / 'side_by_side'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
