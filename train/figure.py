"""Side-by-side figure of several models on test images: original | JPEG | each model, every
panel labelled with its PSNR on the whole image, cropped where JPEG hurts most and enlarged.

    python -m train.figure runs/*/image_compression_model.pth --images bikes,monarch --quality 10 \\
        --out docs/side_by_side_q10.png
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
from PIL import Image
from scipy.ndimage import uniform_filter

from data_pipeline.errors import UserError, command, some
from data_pipeline.images import (
    MAX_PIXELS,
    atomic_write_bytes,
    check_output_file,
    image_files,
    jpeg_roundtrip,
    output_file,
    png_bytes,
    read_image,
)
from data_pipeline.sources import DataError, dataset_dir
from data_pipeline.system import keep_freed_memory
from runtime.figures import panel_strip
from runtime.inference import Restorer
from runtime.metrics.psnr import psnr
from runtime.mlflow_store import checkpoint_path


def worst_crop(original: np.ndarray, jpeg: np.ndarray, size: int) -> tuple[slice, slice]:
    """The size x size window (on the 8-pixel grid) where the JPEG error is largest."""
    err = (original.astype(np.float32) - jpeg.astype(np.float32)) ** 2
    err = err.mean(axis=2) if err.ndim == 3 else err
    local = uniform_filter(err, size, mode="constant")[size // 2: err.shape[0] - size // 2 + 1: 8,
                                                      size // 2: err.shape[1] - size // 2 + 1: 8]
    y, x = np.unravel_index(np.argmax(local), local.shape)
    return slice(y * 8, y * 8 + size), slice(x * 8, x * 8 + size)


def figure(images: dict[str, np.ndarray], models: list[tuple[str, Restorer]], quality: int, crop: int, scale: int) -> Image.Image:
    rows = []
    for name, original in images.items():
        jpeg = jpeg_roundtrip(original, quality)
        ys, xs = worst_crop(original, jpeg, min(crop, *original.shape[:2]))
        panels = [(f"{name} original", original), (f"JPEG q{quality} {psnr(original, jpeg):.2f} dB", jpeg)]
        for label, restorer in models:
            restored = restorer(jpeg, quality)
            panels.append((f"{label} {psnr(original, restored):.2f} dB", restored))
        rows.append(panel_strip([(label, img[ys, xs]) for label, img in panels], scale))
    canvas = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    for i, row in enumerate(rows):
        canvas.paste(row, (0, sum(r.height for r in rows[:i])))
    return canvas


@command
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", type=checkpoint_path, help="models, one column each (labelled by architecture)")
    ap.add_argument("--labels", help="comma-separated column labels (default: each checkpoint's arch)")
    ap.add_argument("--data-root", help="data root (default: $JPEG_RESTORE_DATA_ROOT)")
    ap.add_argument("--dataset", default="live1_gray")
    ap.add_argument("--images", default="bikes,monarch", help="comma-separated image names of the dataset")
    ap.add_argument("--quality", type=int, default=10)
    ap.add_argument("--crop", type=int, default=128, help="side of the crop shown, in pixels")
    ap.add_argument("--scale", type=int, default=2, help="enlargement of the crops")
    ap.add_argument("--out", type=output_file, required=True, help="PNG to write")
    args = ap.parse_args(argv)
    keep_freed_memory()
    if not 1 <= args.quality <= 100:
        raise UserError(f"--quality must be a JPEG quality in 1..100, got {args.quality}")
    if args.crop < 8 or args.scale < 1:
        raise UserError(f"--crop must be at least 8 pixels and --scale at least 1, got {args.crop} and {args.scale}")
    if args.out.suffix.lower() != ".png":
        raise UserError(f"--out must name a .png file (the figure is a PNG), got {args.out}")
    check_output_file(args.out, "--out")
    names = args.images.split(",")
    if not all(names):
        raise UserError(f"--images must be comma-separated image names, got {args.images!r}")
    folder = dataset_dir(args.dataset, args.data_root)
    by_name = {p.stem: p for p in reversed(image_files(folder)[0])}  # any format, the first of a name as in evaluate
    images = {}
    for name in names:
        if name not in by_name:
            held = f"it holds {some(sorted(by_name))}" if by_name else "it holds no images"
            raise DataError(f"no image named {name!r} in {folder} ({held})")
        images[name] = read_image(by_name[name], None, min_size=8)
    side = max(min(args.crop, *img.shape[:2]) for img in images.values()) * args.scale
    width, height = (2 + len(args.checkpoints)) * side, len(images) * side
    if width * height > MAX_PIXELS:  # Pillow's decompression-bomb limit: not even this project would read it
        raise UserError(f"the figure would be at least {width}x{height} ({width * height / 1e6:.0f} MP), more than "
                        f"the {MAX_PIXELS / 1e6:.0f} MP Pillow opens: lower --scale or --crop")
    restorers = [Restorer(c) for c in args.checkpoints]
    labels = args.labels.split(",") if args.labels else [r.meta["arch"] for r in restorers]
    if len(labels) != len(restorers):
        raise UserError(f"{len(labels)} labels for {len(restorers)} checkpoints")
    canvas = figure(images, list(zip(labels, restorers)), args.quality, args.crop, args.scale)
    atomic_write_bytes(args.out, png_bytes(np.asarray(canvas)))
    print(f"wrote {args.out} ({canvas.width}x{canvas.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
