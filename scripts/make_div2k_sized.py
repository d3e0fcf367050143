"""Photos of DIV2K's size from the BSDS color set, for the loader benchmark's tile figures
(README, Preparation): the first N photos, bicubic to 2040x1356 (1356x2040 upright).

    python scripts/make_div2k_sized.py ../shared/data/train_color /tmp/div2k_sized --count 24
    python -m data_pipeline.benchmark --modes rgb --dataset /tmp/div2k_sized --tile 480 --cache-mb 0
"""
import argparse
from pathlib import Path

from PIL import Image

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("source", type=Path, help="a folder of photos (the BSDS color set)")
ap.add_argument("out", type=Path, help="folder for the PNGs")
ap.add_argument("--count", type=int, default=24)
args = ap.parse_args()
args.out.mkdir(parents=True, exist_ok=True)
photos = sorted(args.source.iterdir())[:args.count]
for path in photos:
    with Image.open(path) as im:
        im = im.convert("RGB")
        size = (2040, 1356) if im.width >= im.height else (1356, 2040)
        im.resize(size, Image.BICUBIC).save(args.out / f"{path.stem}.png")
print(f"wrote {len(photos)} images into {args.out}")
