"""PSNR (scikit-image), data range 255; color: one MSE over all channels."""
from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio

from . import register_metric


@register_metric("psnr", "PSNR", order=0)
def psnr(ref: np.ndarray, out: np.ndarray) -> float:
    return float(peak_signal_noise_ratio(ref, out, data_range=255))


def psnr_torch(ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (N,) of float NCHW batches in [0, 1], on the uint8 levels the protocol measures."""
    q = lambda x: torch.round(x.float().clamp(0, 1) * 255)  # noqa: E731
    mse = (q(ref) - q(out)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0**2 / mse)
