"""PSNR-B (Yim & Bovik 2011) by hand, as in the QGAC/KAIR code: no library has it."""
from __future__ import annotations

import numpy as np

from . import register_metric, row_bands, squared_error_sum


def blocking_effect_factor(img: np.ndarray, block: int = 8) -> float:
    """BEF of one channel (0..255 scale): excess squared difference across 8x8 block boundaries over
    the difference inside blocks, weighted by log2(B)/log2(min(H, W)). Summed a band of rows at a
    time; on uint8 images every sum is exact, so the value is that of the whole-image sums."""
    h, w = img.shape
    d_across = d_down = b_across = b_down = 0.0
    for rows in row_bands(h, w):
        band = img[rows.start:min(rows.stop + 1, h)].astype(np.float64)  # a row more: the steps down from its last
        across = np.square(np.diff(band[:rows.stop - rows.start], axis=1))
        down = np.square(np.diff(band, axis=0))
        d_across, d_down = d_across + across.sum(), d_down + down.sum()
        b_across += across[:, block - 1::block].sum()  # columns 7|8, 15|16, ...
        b_down += down[(block - 1 - rows.start) % block::block].sum()  # rows 7|8, ... of the image
    n_bound = h * (w // block - 1) + w * (h // block - 1)  # KAIR's counts (one short where a side is no multiple of 8)
    n_inner = h * (w - 1) + w * (h - 1) - n_bound
    d_bound = (b_across + b_down) / n_bound
    d_inner = (d_across + d_down - b_across - b_down) / n_inner
    if d_bound <= d_inner:
        return 0.0
    return float(np.log2(block) / np.log2(min(h, w)) * (d_bound - d_inner))


@register_metric("psnrb", "PSNR-B", order=2, min_side=16)  # a block boundary each way (KAIR counts w // 8 - 1)
def psnrb(ref: np.ndarray, out: np.ndarray) -> float:
    """10 log10(255^2 / (MSE + BEF(out))); color: mean over channels."""
    if ref.ndim == 2:
        ref, out = ref[..., None], out[..., None]
    vals = []
    for c in range(ref.shape[2]):
        mse = np.float64(squared_error_sum(ref[..., c], out[..., c])) / (ref.shape[0] * ref.shape[1])
        with np.errstate(divide="ignore"):  # identical images: inf, as PSNR gives, without numpy's warning
            vals.append(10 * np.log10(255.0**2 / (mse + blocking_effect_factor(out[..., c]))))
    return float(np.mean(vals))
