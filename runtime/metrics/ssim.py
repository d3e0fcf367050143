"""SSIM (Wang et al.) with an 11x11 Gaussian window, sigma 1.5 (scikit-image); color: mean over channels."""
from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity

from . import register_metric, row_bands

SSIM_SIGMA = 1.5  # skimage truncates at 3.5 sigma: an 11x11 window; K1 0.01, K2 0.03 are its defaults
RADIUS = int(3.5 * SSIM_SIGMA + 0.5)  # skimage leaves out the border this wide, where the window leaves the image


def _ssim(ref: np.ndarray, out: np.ndarray, full: bool = False):
    return structural_similarity(ref, out, gaussian_weights=True, sigma=SSIM_SIGMA, use_sample_covariance=False,
                                 data_range=255, full=full)


@register_metric("ssim", "SSIM", digits=3, order=1, min_side=2 * RADIUS + 1)
def ssim(ref: np.ndarray, out: np.ndarray) -> float:
    """scikit-image's SSIM map a band of rows at a time, each band read with the window's radius of
    rows around it, so each pixel's value is the one of the whole image (the sum's order moves the
    16th digit)."""
    if ref.ndim == 2:
        ref, out = ref[..., None], out[..., None]
    h, w, channels = ref.shape
    bands = row_bands(h, w, RADIUS, h - RADIUS) if min(h, w) > 2 * RADIUS else []
    if len(bands) < 2:  # one band: the library's call as it is (and its errors)
        return float(np.mean([_ssim(ref[..., c], out[..., c]) for c in range(channels)]))
    means = []
    for c in range(channels):
        total = 0.0
        for rows in bands:
            band = slice(rows.start - RADIUS, rows.stop + RADIUS)
            _, ssim_map = _ssim(ref[band, :, c], out[band, :, c], full=True)
            total += ssim_map[RADIUS:-RADIUS, RADIUS:-RADIUS].sum(dtype=np.float64)
        means.append(total / ((h - 2 * RADIUS) * (w - 2 * RADIUS)))
    return float(np.mean(means))
