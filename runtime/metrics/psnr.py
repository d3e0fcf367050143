"""PSNR (scikit-image), data range 255; color: one MSE over all channels."""
from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio

from . import register_metric


@register_metric("psnr", "PSNR", order=0)
def psnr(ref: np.ndarray, out: np.ndarray) -> float:
    with np.errstate(divide="ignore"):  # identical images: inf, without numpy's warning
        return float(peak_signal_noise_ratio(ref, out, data_range=255))
