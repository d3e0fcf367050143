"""PSNR-B (Yim & Bovik 2011) by hand, as in the QGAC/KAIR code: no library has it."""
from __future__ import annotations

import numpy as np

from . import register_metric


def blocking_effect_factor(img: np.ndarray, block: int = 8) -> float:
    """BEF of one channel (float, 0..255 scale): excess squared difference across 8x8 block
    boundaries over the difference inside blocks, weighted by log2(B)/log2(min(H, W))."""
    h, w = img.shape
    cols_b = np.arange(block - 1, w - 1, block)
    rows_b = np.arange(block - 1, h - 1, block)
    cols_n = np.setdiff1d(np.arange(w - 1), cols_b)
    rows_n = np.setdiff1d(np.arange(h - 1), rows_b)
    d_bound = ((img[:, cols_b] - img[:, cols_b + 1]) ** 2).sum() + ((img[rows_b] - img[rows_b + 1]) ** 2).sum()
    d_inner = ((img[:, cols_n] - img[:, cols_n + 1]) ** 2).sum() + ((img[rows_n] - img[rows_n + 1]) ** 2).sum()
    n_bound = h * (w // block - 1) + w * (h // block - 1)
    n_inner = h * (w - 1) + w * (h - 1) - n_bound
    d_bound, d_inner = d_bound / n_bound, d_inner / n_inner
    if d_bound <= d_inner:
        return 0.0
    return float(np.log2(block) / np.log2(min(h, w)) * (d_bound - d_inner))


@register_metric("psnrb", "PSNR-B", order=2, min_side=16)  # a block boundary each way (KAIR counts w // 8 - 1)
def psnrb(ref: np.ndarray, out: np.ndarray) -> float:
    """10 log10(255^2 / (MSE + BEF(out))); color: mean over channels."""
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    if ref.ndim == 2:
        ref, out = ref[..., None], out[..., None]
    vals = []
    for c in range(ref.shape[2]):
        mse = np.mean((ref[..., c] - out[..., c]) ** 2)
        vals.append(10 * np.log10(255.0**2 / (mse + blocking_effect_factor(out[..., c]))))
    return float(np.mean(vals))
