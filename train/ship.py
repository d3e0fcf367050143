"""Ship a trained model: a run's best checkpoint becomes the default model of restore and evaluate
(`image_compression_model.pth` for gray, `image_compression_model_color.pth` for RGB, by the
checkpoint's mode), weights only and within the size cap: when the fp32 file would be larger, the
float weights are stored as fp16 (they load back into fp32 models; the output change is reported).

    python -m train.ship runs/unet-gpu/image_compression_model.pth

It replaces the shipped model only when the new one validated better on the same held-out images
(same dataset, channel mode, qualities and split); --force ships it anyway. The shipped file then
becomes a new version of the MLflow registered model of its name (alias `shipped`), logged to the
checkpoint's training run, when that run is in the store.

    python -m train.ship --register [image_compression_model.pth ...]

registers shipped files without shipping (default: both) in this machine's store: one whose
training run the store lacks (a fresh clone: a run's history stays in the store it trained against)
gets a run made from the file's own record (its config as params, its validation metrics at its
step), which its run id then finds (evaluate --log-mlflow, the latency table).
"""
from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data_pipeline.errors import UserError, command
from data_pipeline.images import jpeg_roundtrip, output_file, rgb_to_luma
from data_pipeline.system import keep_freed_memory
from runtime import checkpoint as ckpt
from runtime.inference import SHIPPED_COLOR, SHIPPED_GRAY, Restorer
from runtime.metrics.psnr import psnr
from runtime.mlflow_store import RECORD, register_shipped, run_for, unloggable

from .import_run import import_run
from .loop.tracking import flatten

MAX_MB = 40.0
WEIGHT_KEYS = ("format", "arch", "kwargs", "mode", "channels", "state_dict", "config", "metrics", "step", "mlflow_run_id",
               "restore_max_quality", "quality_gains")  # the last two: train.quality_bound's


def validation_set(blob: dict) -> str:
    """Which held-out images the checkpoint's validation PSNR comes from."""
    data = blob.get("config", {}).get("data", {})
    return ", ".join(f"{k} {data.get(k)}" for k in ("dataset", "mode", "qualities", "val_fraction", "limit", "min_size"))


def file_mb(blob: dict) -> float:
    buf = io.BytesIO()
    torch.save(blob, buf)
    return buf.tell() / 1e6


def fp16_storage(blob: dict) -> dict:
    state = {k: v.half() if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    return {**blob, "state_dict": state, "weights_dtype": "float16"}


def output_change_db(fp32_file: Path, fp16_file: Path, mode: str) -> float:
    """PSNR between the two files' restorations of a real photo at q10 (inf: identical)."""
    import skimage.data
    photo = skimage.data.astronaut()[:256, :256]
    photo = rgb_to_luma(photo) if mode == "gray" else photo
    jpeg = jpeg_roundtrip(photo, 10)
    a, b = Restorer(fp32_file)(jpeg, 10), Restorer(fp16_file)(jpeg, 10)
    return float("inf") if np.array_equal(a, b) else psnr(a, b)


def shipped_file(mode: str) -> Path:
    return SHIPPED_COLOR if mode == "rgb" else SHIPPED_GRAY


def ship(source: Path, out: Path | None = None, max_mb: float = MAX_MB, force: bool = False) -> str:
    ckpt.load_model(source)  # a model checkpoint that rebuilds, or a one-line error
    blob = {k: v for k, v in ckpt.load(source).items() if k in WEIGHT_KEYS}
    out = out or shipped_file(blob["mode"])
    if out.exists() and out.resolve() == Path(source).resolve():
        raise UserError(f"{source} is {out} itself: ship a run's checkpoint, not the shipped file")
    if not max_mb > 0:
        raise UserError(f"--max-mb must be positive, got {max_mb:g}")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: name the model file")
    new_psnr = blob.get("metrics", {}).get("val_psnr", float("nan"))
    if out.exists() and not force:
        old = ckpt.load(out)
        old_psnr = old.get("metrics", {}).get("val_psnr", float("nan"))
        if validation_set(old) != validation_set(blob):
            raise UserError(f"{out} was validated on ({validation_set(old)}), {source} on ({validation_set(blob)}): "
                            "not comparable; --force to ship anyway")
        if not new_psnr > old_psnr:
            raise UserError(f"{source} validated at {new_psnr:.3f} dB, no better than {out} ({old_psnr:.3f} dB); "
                            "--force to ship anyway")
    report = f"{source} -> {out}: {blob['arch']} {blob['mode']}, validation PSNR {new_psnr:.3f} dB"
    size = file_mb(blob)
    if size > max_mb:
        half = fp16_storage(blob)
        half_mb = file_mb(half)
        if half_mb > max_mb:
            raise UserError(f"{source}: {size:.1f} MB in fp32, {half_mb:.1f} MB in fp16, over the {max_mb:g} MB cap")
        ckpt.save(half, out)
        change = output_change_db(source, out, blob["mode"])
        same = "the same output as" if change == float("inf") else f"output {change:.1f} dB PSNR from"
        return f"{report}, fp16 weights ({size:.1f} MB in fp32 is over {max_mb:g}): {half_mb:.1f} MB, " \
               f"{same} the fp32 weights' on a q10 photo"
    ckpt.save(blob, out)
    return f"{report}, {size:.1f} MB"


def register(shipped: Path) -> str:
    """The shipped file as a new version of its MLflow registered model, tagged with what it is."""
    blob = ckpt.load(shipped)
    val_psnr = blob.get("metrics", {}).get("val_psnr", float("nan"))
    tags = {"arch": blob["arch"], "mode": blob["mode"], "val_psnr": f"{val_psnr:.4f}", "validated_on": validation_set(blob),
            "file": str(shipped.resolve())}
    return register_shipped(blob.get("mlflow_run_id"), shipped, tags)


def record_run(shipped: Path) -> str:
    """The shipped file's training run in this store: made from the file's own record when the store
    lacks it (as an offline record is imported: tagged with the run id the file names)."""
    blob = ckpt.load(shipped)
    run_id = blob.get("mlflow_run_id")
    if not run_id:
        raise UserError(f"{shipped} names no training run: nothing to make a run for")
    if unloggable(run_id) is None:
        stand_in = run_for(run_id)
        return f"{shipped.name}: " + (f"run {stand_in} stands for its training run {run_id}" if stand_in else
                                      f"its training run {run_id} is in the store")
    config, now = blob.get("config", {}), time.time()
    events = [{"start": {"run_id": run_id, "run_name": f"{blob['arch']} {blob['mode']} (record of {shipped.name})",
                         "experiment": config.get("tracking", {}).get("experiment", "")}},
              {"params": flatten(config)},
              {"tags": {"shipped_file": shipped.name, "record": "made from the shipped file by train.ship --register: its config, "
                        "validation metrics and step; the training history is in the store the model trained against"}},
              {"metrics": blob.get("metrics", {}), "step": blob.get("step", 0)},
              {"status": "FINISHED"}]
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / RECORD).write_text("".join(json.dumps({**e, "time": now}) + "\n" for e in events))
        made = import_run(Path(folder))
    return f"{shipped.name}: its training run {run_id} is not in the store: made run {made} from the file's record"


@command
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, nargs="*", help="a run's image_compression_model.pth (--register: shipped files)")
    ap.add_argument("--register", action="store_true", help="register shipped files in this store without shipping")
    ap.add_argument("--out", type=output_file, help="default: the shipped gray or color model of the repository")
    ap.add_argument("--max-mb", type=float, default=MAX_MB, help="size cap of the shipped file (MB)")
    ap.add_argument("--force", action="store_true", help="replace the shipped model even when not better on validation")
    args = ap.parse_args(argv)
    if args.register:
        if args.out or args.force or args.max_mb != MAX_MB:
            ap.error("--register ships nothing: it takes no --out, --force or --max-mb")
        for shipped in args.checkpoint or [f for f in (SHIPPED_GRAY, SHIPPED_COLOR) if f.exists()]:
            print(record_run(shipped))
            print(register(shipped))
        return 0
    if len(args.checkpoint) != 1:
        ap.error("give one checkpoint to ship")
    keep_freed_memory()
    print(ship(args.checkpoint[0], args.out, args.max_mb, args.force))
    out = args.out or shipped_file(ckpt.load(args.checkpoint[0])["mode"])
    print(register(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
