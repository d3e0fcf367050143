"""The main job end to end on an embedded default: the natural photographs that ship inside
scikit-image (no download). Prepares them, checks every available loader backend, trains a
U-Net for a few minutes on CPU (MLflow run in mlruns/), then evaluates it against plain JPEG
on the held-out photographs and writes the table and side-by-side images.

    python -m train.quickstart [--out outputs/quickstart] [--steps 400]
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from data_pipeline.errors import UserError, command
from data_pipeline.images import atomic_write_bytes, read_image
from data_pipeline.prepare import load_manifest, prepare, split_records
from data_pipeline.sources import skimage_dir
from data_pipeline.system import keep_freed_memory
from runtime.mlflow_store import log_to_run

from .evaluate import evaluate, format_table, write_side_by_side

# torch, the loaders and the trainer are imported in the functions that use them: the evaluation's
# metric workers import this module again (spawn does), as train/evaluate.py says
if TYPE_CHECKING:
    from .loop.trainer import Trainer

QUALITIES = [10, 20, 30, 40]
VAL_FRACTION = 0.2  # holds out 3 of the 17 photographs: astronaut, camera, retina
# The shipped model's family. The plain U-Net (configs/unet.toml) stays the identity on these smooth
# photographs: the ReLUs of its last block die within 20 steps (docs/experiments.md).
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "unet_bn.toml"


def check_loaders(prepared: Path) -> None:
    from data_pipeline.backends import backends
    from data_pipeline.config import DataConfig
    from data_pipeline.loaders import build_loader

    for backend in [name for name, cls in backends().items() if cls.unavailable() is None]:
        loader = build_loader(DataConfig(backend=backend, prepared_dir=str(prepared), batch_size=8))
        start, n = time.perf_counter(), 0
        for x, _ in itertools.islice(loader, 10):
            n += x.shape[0]
        loader.close()
        print(f"loader {backend:>9}: batches {tuple(x.shape)} in [{x.min():.2f}, {x.max():.2f}], "
              f"{n / (time.perf_counter() - start):.0f} patches/s")


def centre_crop(img, size: int):
    h, w = img.shape[:2]
    y, x = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return img[y:y + size, x:x + size]


def train(prepared: Path, out: Path, steps: int) -> Trainer:
    from .loop.config import load_config
    from .loop.distributed import cleanup, init_distributed
    from .loop.trainer import Trainer

    cfg = load_config(CONFIG, [f"data.prepared_dir={json.dumps(str(prepared))}", "data.dataset=skimage",
                               f"data.val_fraction={VAL_FRACTION}", f"data.qualities={QUALITIES}",
                               "data.batch_size=16", f"train.max_steps={steps}", f"train.val_every={max(steps // 2, 1)}",
                               f"train.ckpt_every={max(steps // 2, 1)}", f"train.log_every={max(steps // 20, 1)}",
                               "schedule.warmup_steps=0", "tracking.run_name=quickstart-unet"])
    trainer = Trainer(cfg, out / "run", init_distributed(cfg.train.ddp_timeout_s), resume=True)  # a rerun continues
    try:
        trainer.fit()
    finally:
        trainer.close()
        cleanup()
    return trainer


@command
def main(argv=None) -> int:
    from runtime.inference import Restorer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("outputs/quickstart"))
    ap.add_argument("--steps", type=int, default=400, help="training steps (400: a few minutes on 2 CPU cores)")
    ap.add_argument("--eval-size", type=int, default=0, help="evaluate on centre crops of this side (0: whole photographs)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.eval_size < 0 or 0 < args.eval_size < 8:  # before minutes of training, not after
        raise UserError(f"--steps must be at least 1 and --eval-size 0 (whole photographs) or at least 8 pixels "
                        f"(JPEG's block), got {args.steps} and {args.eval_size}")
    keep_freed_memory()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = args.out
    prepared = out / "prepared" / "skimage-gray"

    manifest = prepare(skimage_dir(), prepared, "gray", QUALITIES, val_fraction=VAL_FRACTION)
    held_out = split_records(manifest, "val")
    print(f"prepared {len(manifest['files'])} scikit-image photographs into {prepared} ({len(held_out)} held out)")
    check_loaders(prepared)

    trainer = train(prepared, out, args.steps)
    if not trainer.finished:  # a signal stopped it, its state saved
        print(f"stopped at step {trainer.step} of {args.steps}: the same command continues from there", file=sys.stderr)
        return 128 + signal.Signals[trainer.stop_signal]
    best = trainer.best_path

    images = {f["name"]: read_image(prepared / f["original"]["path"], "gray") for f in split_records(load_manifest(prepared), "val")}
    if args.eval_size:
        images = {name: centre_crop(img, args.eval_size) for name, img in images.items()}
    restorer = Restorer(best, precision="auto")  # bf16 where it is native, as the training ran: 3x faster there
    results, extra = evaluate(images, QUALITIES, restore=restorer, keep=2)
    print(log_to_run(restorer.meta.get("mlflow_run_id"),
                     {f"skimage_heldout_{kind}_{m}_q{q}": v for q, r in results.items() for kind, ms in r.items() for m, v in ms.items()}))
    table = format_table(f"U-Net ({args.steps} steps) vs JPEG on {len(images)} held-out scikit-image photographs (gray)", results)
    print(table)
    atomic_write_bytes(out / "results.md", ("```\n" + table + "\n```\n").encode())
    atomic_write_bytes(out / "results.json", json.dumps({"dataset": "skimage held-out", "images": sorted(images),
                                                          "checkpoint": str(best), "precision": restorer.precision, "results": results}, indent=2).encode())
    figures = write_side_by_side({10: extra["kept"][10]}, out / "side_by_side")
    print(f"wrote {out / 'results.md'}, {best} and {len(figures)} side-by-side images in {out / 'side_by_side'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
