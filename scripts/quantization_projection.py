"""Does it help to project a restored image onto its JPEG's quantization constraint set?
(docs/experiments.md, "Projecting onto the JPEG's own coefficients"):

    python scripts/quantization_projection.py --data-root ../shared/data [--qualities 10,40]

A JPEG stores each 8x8 block's DCT coefficients as integers k times its quantization table's Q,
so the original's coefficient lay in [(k - 1/2) Q, (k + 1/2) Q]. That box is convex and holds the
original, and the block DCT is orthonormal: clipping a restored image's coefficients into it is the
nearest image inside, never farther from the original than the restored one (the POCS deblocking
methods of the 1990s). k is read back from the JPEG's own decode (in gray Pillow's, in color the
luma plane as stored, without the conversion to RGB). A color image's luma is projected and each
of R, G, B moves by the luma's change, so its chroma stays. Scored on the held-out images of the
shipped models' training set (the BSDS color set, as luma for the gray model), never LIVE1.
"""
from __future__ import annotations

import argparse
import io
import sys

import numpy as np
from PIL import Image
from scipy.fft import dctn, idctn

from data_pipeline.config import DataConfig
from data_pipeline.images import decode_jpeg, jpeg_bytes, read_image
from data_pipeline.prepare import parse_qualities, split_of
from data_pipeline.sources import dataset_dir
from runtime.checkpoint import LUMA_WEIGHTS
from runtime.inference import SHIPPED_COLOR, SHIPPED_GRAY, Restorer
from runtime.metrics.psnr import psnr

JFIF_LUMA = np.array(LUMA_WEIGHTS)  # JPEG's own Y of R, G, B (full range)


def block_dct(plane: np.ndarray) -> np.ndarray:
    """The JPEG DCT of every 8x8 block (the plane level-shifted by 128 and padded to whole blocks by
    repeating its last row and column, as libjpeg pads): (rows, columns, 8, 8)."""
    h, w = plane.shape
    padded = np.pad(plane.astype(np.float64) - 128, ((0, -h % 8), (0, -w % 8)), mode="edge")
    blocks = padded.reshape(padded.shape[0] // 8, 8, padded.shape[1] // 8, 8).transpose(0, 2, 1, 3)
    return dctn(blocks, axes=(2, 3), norm="ortho")


def project_luma(luma: np.ndarray, decoded_luma: np.ndarray, table) -> np.ndarray:
    """`luma` (float) with each block's DCT coefficients clipped into the quantization interval of
    the JPEG whose luma decodes to `decoded_luma` (uint8) with this luma table (64 values, row by row)."""
    q = np.asarray(table, dtype=np.float64).reshape(8, 8)
    k = np.round(block_dct(decoded_luma) / q)
    coefficients = np.clip(block_dct(luma), (k - 0.5) * q, (k + 0.5) * q)
    rows, columns = coefficients.shape[:2]
    image = idctn(coefficients, axes=(2, 3), norm="ortho").transpose(0, 2, 1, 3).reshape(rows * 8, columns * 8) + 128
    return image[:luma.shape[0], :luma.shape[1]]


def projected(restored: np.ndarray, jpeg: bytes) -> np.ndarray:
    """The restored uint8 image (gray, or RGB) projected onto the luma constraint set of `jpeg`."""
    with Image.open(io.BytesIO(jpeg)) as im:
        table = im.quantization[0]
        im.draft("YCbCr", im.size)  # a color JPEG's planes as stored: its luma is exact there, not from rounded RGB
        decoded_luma = np.asarray(im)[..., 0] if im.mode == "YCbCr" else np.asarray(im)
    values = restored.astype(np.float64)
    if restored.ndim == 2:
        out = project_luma(values, decoded_luma, table)
    else:
        luma = values @ JFIF_LUMA
        out = values + (project_luma(luma, decoded_luma, table) - luma)[..., None]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", help="default: $JPEG_RESTORE_DATA_ROOT")
    ap.add_argument("--dataset", default="train_color", help="the training set whose held-out images are scored")
    ap.add_argument("--qualities", default="10,40")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    args = ap.parse_args(argv)
    folder = dataset_dir(args.dataset, args.data_root)
    held_out = [p for p in sorted(folder.iterdir()) if p.is_file() and split_of(p.stem, DataConfig().val_fraction) == "val"]
    print(f"{len(held_out)} held-out images of {folder}; PSNR (dB): JPEG, shipped model, projected")
    for mode, checkpoint in (("gray", SHIPPED_GRAY), ("rgb", SHIPPED_COLOR)):
        model = Restorer(checkpoint, precision=args.precision)
        originals = [read_image(p, mode) for p in held_out]
        for q in parse_qualities(args.qualities):
            rows = []
            for original in originals:
                jpeg = jpeg_bytes(original, q)
                decoded = decode_jpeg(jpeg)
                restored = model(decoded, q)
                rows.append([psnr(original, decoded), psnr(original, restored), psnr(original, projected(restored, jpeg))])
            rows = np.array(rows)
            jpeg_psnr, model_psnr, projected_psnr = rows.mean(0)
            print(f"{mode:>4} q{q}: {jpeg_psnr:.4f} {model_psnr:.4f} {projected_psnr:.4f} ({projected_psnr - model_psnr:+.4f}; "
                  f"{int((rows[:, 2] > rows[:, 1]).sum())} of {len(rows)} images gain, the least {np.min(rows[:, 2] - rows[:, 1]):+.4f})",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
