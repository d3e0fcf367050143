"""SSIM (Wang et al.) with an 11x11 Gaussian window, sigma 1.5 (scikit-image); color: mean over channels."""
from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity

from . import register_metric

SSIM_SIGMA = 1.5  # skimage truncates at 3.5 sigma: an 11x11 window; K1 0.01, K2 0.03 are its defaults


@register_metric("ssim", "SSIM", digits=3, order=1)
def ssim(ref: np.ndarray, out: np.ndarray) -> float:
    return float(structural_similarity(ref, out, gaussian_weights=True, sigma=SSIM_SIGMA,
                                       use_sample_covariance=False, data_range=255,
                                       channel_axis=-1 if ref.ndim == 3 else None))
