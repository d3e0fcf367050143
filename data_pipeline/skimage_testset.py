"""A second test set from outside the data root: the lossless natural photos and textures that ship
inside scikit-image, written as PNG folders that `train.evaluate --dataset` reads. It checks that
gains measured on LIVE1 hold on images no shipped model was trained or chosen on (only the
quick-start demo trains on them).

    python -m data_pipeline.skimage_testset outputs/skimage_test
    python -m train.evaluate --dataset outputs/skimage_test/gray
    python -m train.evaluate --dataset outputs/skimage_test/color

gray/: the native gray photos and textures, plus the color photos as BT.601 studio-range luma (as
LIVE1 gray is made); color/: the color photos. The JPEG files there (rocket, retina, hubble) and
the synthetic or binary images (chessboards, logos, phantom, text) are left out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from data_pipeline.errors import UserError, command
from data_pipeline.images import atomic_write_bytes, png_bytes, read_image, rgb_to_luma
from data_pipeline.sources import skimage_dir

COLOR_PHOTOS = ("astronaut", "chelsea", "coffee", "ihc", "motorcycle_left")
GRAY_PHOTOS = ("camera", "coins", "moon", "brick", "grass", "gravel")


def load(name: str) -> np.ndarray:
    path = skimage_dir() / f"{name}.png"
    if not path.is_file():
        raise UserError(f"{path} is missing: this scikit-image does not ship it")
    return read_image(path, None)


def write_testset(out: Path) -> dict[str, list[Path]]:
    """Writes out/gray/*.png and out/color/*.png; returns the files written per folder."""
    written: dict[str, list[Path]] = {"gray": [], "color": []}
    for name in COLOR_PHOTOS:
        rgb = load(name)
        for kind, img in (("color", rgb), ("gray", rgb_to_luma(rgb))):
            path = out / kind / f"{name}.png"
            atomic_write_bytes(path, png_bytes(img))
            written[kind].append(path)
    for name in GRAY_PHOTOS:
        path = out / "gray" / f"{name}.png"
        atomic_write_bytes(path, png_bytes(load(name)))
        written["gray"].append(path)
    return written


@command
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="folder to write gray/ and color/ into")
    args = ap.parse_args(argv)
    try:
        written = write_testset(args.out)
    except OSError as exc:
        raise UserError(f"cannot write the test set into {args.out}: {exc.strerror or exc}") from None
    for kind, paths in written.items():
        print(f"{len(paths)} {kind} images -> {args.out / kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
