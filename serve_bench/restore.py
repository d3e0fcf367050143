"""Restore JPEG images with a trained model.

    python -m serve_bench.restore photo.jpg scans/ -o restored/ [--backend torch|onnxruntime|tensorrt]

Any size (tiled above 512 px with overlap, so memory stays bounded), gray or color. A gray
model on a color image restores the luma (Y of JPEG's own YCbCr) and keeps the chroma; an RGB
model restores all three channels. Writes <name>.png into the output folder; never overwrites an
input. The default model is image_compression_model.pth in the repository (gray) and, for color
images, image_compression_model_color.pth next to it when it exists.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from data_pipeline.images import BadImage, atomic_write_bytes, list_images, png_bytes, read_image
from train.checkpoint import CheckpointError, load_model
from train.inference import SHIPPED_GRAY, image_to_tensor, in_model_mode, shipped_model
from train.metrics import to_uint8

from .runners import RUNNERS, RunnerUnavailable


def make_runner(checkpoint: Path, backend: str, device: str, out_dir: Path):
    model, meta = load_model(checkpoint)
    if backend == "torch":
        return RUNNERS["torch"](model, device=device), meta
    if backend == "onnxruntime":
        from export.to_onnx import export_onnx

        onnx_path = checkpoint.with_suffix(".onnx")
        if not onnx_path.is_file() or onnx_path.stat().st_mtime < checkpoint.stat().st_mtime:
            onnx_path = out_dir / ".onnx" / f"{checkpoint.stem}.onnx"
            export_onnx(checkpoint, onnx_path)
        return RUNNERS["onnxruntime"](onnx_path, device=device, tile=getattr(model, "tile", 0)), meta
    if backend == "tensorrt":
        if "tensorrt" not in RUNNERS:
            raise RunnerUnavailable("TensorRT is not installed (pip install -e \".[tensorrt]\" on a GPU machine)")
        return RUNNERS["tensorrt"](checkpoint.with_suffix(".fp16.engine")), meta
    raise RunnerUnavailable(f"unknown backend {backend!r}")


def restore_array(runner, mode: str, img: np.ndarray, ensemble: bool = False) -> np.ndarray:
    """uint8 gray or RGB -> restored uint8 of the same shape."""
    def restore(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return to_uint8(runner.restore(image_to_tensor(x, runner.device), ensemble).clamp(0, 1)[0])

    return in_model_mode(restore, mode, img)


def inputs_of(paths: list[Path]) -> list[Path]:
    files = []
    for p in paths:
        if p.is_dir():
            files += list_images(p)
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p} does not exist")
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", type=Path, help="JPEG images or folders of images")
    ap.add_argument("-o", "--out", type=Path, required=True, help="output folder for the restored PNGs")
    ap.add_argument("--backend", default="torch", choices=["torch", "onnxruntime", "tensorrt"])
    ap.add_argument("--checkpoint", type=Path, help="model for gray images (and color, unless --color-checkpoint)")
    ap.add_argument("--color-checkpoint", type=Path, help="RGB model for color images")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--self-ensemble", action="store_true",
                    help="average the model over the 8 rotations and flips of each image (8x the time, a little sharper)")
    args = ap.parse_args(argv)
    try:
        files = inputs_of(args.inputs)
        gray_ckpt = args.checkpoint or SHIPPED_GRAY
        color_ckpt = args.color_checkpoint or args.checkpoint or shipped_model(color=True)
        runners = {"gray": make_runner(gray_ckpt, args.backend, args.device, args.out)}
        runners["color"] = runners["gray"] if color_ckpt == gray_ckpt else make_runner(color_ckpt, args.backend, args.device, args.out)
    except (FileNotFoundError, CheckpointError, RunnerUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    resolved_inputs = {f.resolve() for f in files}
    failed = 0
    for f in files:
        target = args.out / f"{f.stem}.png"
        if target.resolve() in resolved_inputs:
            print(f"skipped {f}: the output {target} would overwrite an input", file=sys.stderr)
            failed += 1
            continue
        try:
            img = read_image(f, None, min_size=8)
        except (BadImage, OSError) as exc:
            print(f"skipped {f}: {exc}", file=sys.stderr)
            failed += 1
            continue
        runner, meta = runners["color" if img.ndim == 3 else "gray"]
        atomic_write_bytes(target, png_bytes(restore_array(runner, meta["mode"], img, args.self_ensemble)))
        how = "luma only" if img.ndim == 3 and meta["mode"] == "gray" else meta["mode"]
        print(f"{f} -> {target} ({img.shape[1]}x{img.shape[0]}, {meta['arch']} {how}, {args.backend})")
    print(f"restored {len(files) - failed} of {len(files)} images into {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
