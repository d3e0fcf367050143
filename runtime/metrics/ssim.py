"""SSIM (Wang et al.) with an 11x11 Gaussian window, sigma 1.5 (scikit-image); color: mean over channels."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

from . import register_metric

SSIM_SIGMA, SSIM_RADIUS = 1.5, 5  # skimage: truncate 3.5 * sigma 1.5 -> 11x11 window
SSIM_K1, SSIM_K2 = 0.01, 0.03


@register_metric("ssim", "SSIM", digits=3, order=1)
def ssim(ref: np.ndarray, out: np.ndarray) -> float:
    return float(structural_similarity(ref, out, gaussian_weights=True, sigma=SSIM_SIGMA,
                                       use_sample_covariance=False, data_range=255,
                                       channel_axis=-1 if ref.ndim == 3 else None))


def ssim_torch(ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (N,) of float NCHW batches in [0, 1], as skimage (window-valid interior)."""
    x, y = (torch.round(t.float().clamp(0, 1) * 255).double() for t in (ref, out))
    c = x.shape[1]
    g = torch.exp(-0.5 * (torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64, device=x.device) / SSIM_SIGMA) ** 2)
    g = g / g.sum()
    win = (g[:, None] * g[None, :]).expand(c, 1, -1, -1).contiguous()
    mu_x, mu_y = F.conv2d(x, win, groups=c), F.conv2d(y, win, groups=c)
    sxx = F.conv2d(x * x, win, groups=c) - mu_x**2
    syy = F.conv2d(y * y, win, groups=c) - mu_y**2
    sxy = F.conv2d(x * y, win, groups=c) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * 255) ** 2, (SSIM_K2 * 255) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).float()
