"""How far above the qualities it was trained on a model still helps, and the bound restore keeps to.

    python -m train.quality_bound image_compression_model.pth --data-root ../shared/data
    python -m train.quality_bound image_compression_model.pth --data-root ../shared/data --write

A model trained on q10-40 still gains over a q60 JPEG but loses detail a q90 one has kept, and
restore leaves JPEGs above its bound as they are. This measures the mean PSNR gain over the JPEG on
the checkpoint's own held-out images (the validation split its training used, from its saved data
config; never LIVE1) at each quality from the trained maximum + 5 to 95, and proposes as the bound
the highest quality up to which every step gains at least --min-gain dB and at most --max-losing of
the images lose. --write records the bound and the gains in the checkpoint (weights unchanged);
without a recorded bound restore keeps to the highest trained quality.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

from data_pipeline.errors import UserError, command
from data_pipeline.images import BadImage, check_detail, read_image
from data_pipeline.prepare import split_of, without_copies
from data_pipeline.sources import DataError, dataset_dir, not_a_file, source_images
from data_pipeline.system import keep_freed_memory
from runtime.metrics import min_image_side

from .evaluate import evaluate

# torch and the model are imported in main: the evaluation's metric workers import this module again
# (spawn does), as train/evaluate.py says


def validation_images(meta: dict, data_root: str | None) -> dict[str, np.ndarray]:
    """The held-out originals of the checkpoint's training data, split as its training split them."""
    data = meta.get("config", {}).get("data")
    if not data or not data.get("dataset"):
        raise UserError("the checkpoint does not name the dataset it was trained on, so its validation images are unknown")
    with tempfile.TemporaryDirectory() as scratch:  # an archive dataset is extracted here
        records, held_out, names = [], {}, set()
        for f in source_images(dataset_dir(data["dataset"], data_root), Path(scratch)):
            if not_a_file(f) or f.stem in names:  # prepare skips those and keeps the first of a name too
                continue
            names.add(f.stem)
            try:
                img = read_image(f, data["mode"], min_size=data.get("min_size", 1))
                check_detail(img)
            except BadImage:
                continue  # prepare skipped it too
            records.append({"name": f.stem, "source": f.name, "original": {"sha256": hashlib.sha256(img.tobytes() + str(img.shape).encode()).hexdigest()}})
            if split_of(f.stem, data["val_fraction"]) == "val":
                held_out[f.stem] = img
    records, _ = without_copies(records)  # a held-out copy of a training image is dropped, as prepare drops it
    kept = sorted(r["name"] for r in records if r["name"] in held_out)[:data.get("limit") or None]
    side, _ = min_image_side()  # validation passes over the smaller ones
    images = {name: held_out[name] for name in kept if min(held_out[name].shape[:2]) >= side}
    if not images:
        raise DataError(f"no validation images in {data['dataset']} at val_fraction {data['val_fraction']}")
    return images


def proposed_bound(gains: dict[int, tuple[float, float]], trained_max: int, min_gain: float, max_losing: float) -> int:
    """The highest quality up to which every measured one (above trained_max) gains at least
    min_gain dB on average with at most max_losing of the images losing; trained_max if none does."""
    bound = trained_max
    for q in sorted(gains):
        mean_gain, losing = gains[q]
        if mean_gain < min_gain or losing > max_losing:
            break
        bound = q
    return bound


@command
def main(argv=None) -> int:
    from runtime import checkpoint as ckpt
    from runtime.device import add_device_option, check_device
    from runtime.inference import Restorer, trained_qualities

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data-root", help="data root (default: $JPEG_RESTORE_DATA_ROOT)")
    ap.add_argument("--min-gain", type=float, default=0.2, help="mean PSNR gain (dB) a quality needs (default 0.2)")
    ap.add_argument("--max-losing", type=float, default=0.1, help="share of images that may lose PSNR (default 0.1)")
    ap.add_argument("--write", action="store_true", help="record the bound and the gains in the checkpoint")
    add_device_option(ap, default="cpu")
    args = ap.parse_args(argv)
    args.device = check_device(args.device)
    if not (math.isfinite(args.min_gain) and 0 <= args.max_losing <= 1):  # --write would record what they give
        raise UserError(f"--min-gain must be a number of dB and --max-losing a share in 0..1, got {args.min_gain} "
                        f"and {args.max_losing}")
    keep_freed_memory()
    restorer = Restorer(args.checkpoint, args.device)
    trained = trained_qualities(restorer.meta)
    if trained is None:
        raise UserError(f"{args.checkpoint} does not say which qualities it was trained on")
    qualities = list(range(trained[1] + 5, 100, 5))
    if not qualities:
        raise UserError(f"{args.checkpoint} was trained up to q{trained[1]}: there is nothing above it to measure")
    images = validation_images(restorer.meta, args.data_root)
    results, extra = evaluate(images, qualities, restore=restorer)
    gains = {}
    print(f"{args.checkpoint}: {len(images)} validation images, trained on q{trained[0]}-{trained[1]}")
    print("   q | JPEG PSNR | gain dB | images losing")
    for q in qualities:
        rows = extra["per_image"][str(q)].values()
        losing = float(np.mean([r["model"]["psnr"] < r["jpeg"]["psnr"] for r in rows]))
        gains[q] = (results[str(q)]["model"]["psnr"] - results[str(q)]["jpeg"]["psnr"], losing)
        print(f"  {q:2d} | {results[str(q)]['jpeg']['psnr']:9.2f} | {gains[q][0]:+7.2f} | {losing:13.0%}")
    bound = proposed_bound(gains, trained[1], args.min_gain, args.max_losing)
    print(f"bound: q{bound} (the highest quality up to which each gains at least {args.min_gain:g} dB with at "
          f"most {args.max_losing:.0%} of the images losing)")
    if args.write:
        blob = ckpt.load(args.checkpoint)
        blob["restore_max_quality"] = bound
        blob["quality_gains"] = {str(q): {"gain_db": g, "losing": share} for q, (g, share) in gains.items()}
        ckpt.save(blob, args.checkpoint)
        print(f"recorded in {args.checkpoint}: restore leaves JPEGs above q{bound} as they are")
    return 0


if __name__ == "__main__":
    sys.exit(main())
