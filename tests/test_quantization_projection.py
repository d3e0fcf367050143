"""scripts/quantization_projection.py: a restored image projected onto its JPEG's quantization
constraint set (docs/experiments.md) is inside that set and never farther from the original."""
from __future__ import annotations

import importlib.util
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from data_pipeline.images import decode_jpeg, jpeg_bytes, rgb_to_luma
from runtime.metrics.psnr import psnr

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "quantization_projection.py"
spec = importlib.util.spec_from_file_location("quantization_projection", SCRIPT)
qp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(qp)


def test_projection_keeps_every_coefficient_in_its_interval_and_comes_no_farther_from_the_original(photos):
    """A smoothed JPEG decode (a crude restorer) of a gray and of a color photograph, 500 px: odd
    sizes, so the last blocks are padded; the projection puts its luma back inside the box that
    holds the original's and is nearer the original in every case."""
    for original in (rgb_to_luma(photos["coffee"])[:397, :501], photos["chelsea"][:299, :451]):
        for quality in (10, 40):
            jpeg = jpeg_bytes(original, quality)
            decoded = decode_jpeg(jpeg)
            sigma = (1.2, 1.2, 0) if decoded.ndim == 3 else 1.2
            smoothed = np.clip(np.round(gaussian_filter(decoded.astype(np.float64), sigma)), 0, 255).astype(np.uint8)
            out = qp.projected(smoothed, jpeg)
            assert out.shape == original.shape and out.dtype == np.uint8
            assert psnr(original, out) > psnr(original, smoothed) + 0.05, quality

            table = np.array(Image.open(io.BytesIO(jpeg)).quantization[0], dtype=np.float64).reshape(8, 8)
            luma = (lambda a: a if a.ndim == 2 else a.astype(np.float64) @ qp.JFIF_LUMA)
            # the decode's luma from its RGB is within a few levels of the stored one: k from it is the same at q10-40
            k = np.round(qp.block_dct(luma(decoded)) / table)
            # rounding to uint8 moves a coefficient by at most 8 x 1/2 level; the color conversion, a little more.
            # Whole blocks only: a partial one is padded from the image it is part of, projected or not.
            slack, whole = (4.0 if out.ndim == 2 else 6.0), (slice(0, original.shape[0] // 8), slice(0, original.shape[1] // 8))
            assert np.all(np.abs(qp.block_dct(luma(out)) - k * table)[whole] <= 0.5 * table + slack)
            assert not np.all(np.abs(qp.block_dct(luma(smoothed)) - k * table)[whole] <= 0.5 * table + slack)  # smoothing left it


def test_the_script_scores_the_shipped_models_on_a_training_sets_held_out_images(color_tiles_dir, tmp_path):
    """Run as the docs say, on a data root whose color set is the photograph tiles."""
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "train_color").symlink_to(color_tiles_dir)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--data-root", str(tmp_path / "root"), "--qualities", "10",
                           "--precision", "fp32"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = re.findall(r"(gray|rgb) q10: (\S+) (\S+) (\S+) \([+-]\S+; \d+ of \d+ images gain, the least (\S+)\)", proc.stdout)
    assert [r[0] for r in rows] == ["gray", "rgb"], proc.stdout
    for _, jpeg, model, projected, least in rows:  # an image with nothing outside the box keeps its PSNR, to rounding
        assert float(jpeg) < float(model) <= float(projected) and float(least) > -0.001, proc.stdout
