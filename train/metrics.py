"""Image-quality metrics, per the evaluation protocol in the data README.

Evaluation (uint8 HxW or HxWx3 arrays): PSNR and SSIM from scikit-image, PSNR-B by hand
(Yim & Bovik 2011; no library has it). In-training validation: torch versions of PSNR and
SSIM on float batches, tested against scikit-image.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

SSIM_SIGMA, SSIM_RADIUS = 1.5, 5  # skimage: truncate 3.5 * sigma 1.5 -> 11x11 window
SSIM_K1, SSIM_K2 = 0.01, 0.03


def to_uint8(img: np.ndarray | torch.Tensor) -> np.ndarray:
    """Float [0,1] (HxW, HxWxC, or CxHxW tensor) -> rounded, clipped uint8 HxW[xC]."""
    if isinstance(img, torch.Tensor):
        img = img.detach().float().cpu().numpy()
        img = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def psnr(ref: np.ndarray, out: np.ndarray) -> float:
    """Data range 255; for color one MSE over all channels."""
    return float(peak_signal_noise_ratio(ref, out, data_range=255))


def ssim(ref: np.ndarray, out: np.ndarray) -> float:
    """Wang et al. with an 11x11 Gaussian window (sigma 1.5); color: mean over channels."""
    return float(structural_similarity(ref, out, gaussian_weights=True, sigma=SSIM_SIGMA,
                                       use_sample_covariance=False, data_range=255,
                                       channel_axis=-1 if ref.ndim == 3 else None))


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


def psnrb(ref: np.ndarray, out: np.ndarray) -> float:
    """PSNR-B = 10 log10(255^2 / (MSE + BEF(out))); color: mean over channels."""
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    if ref.ndim == 2:
        ref, out = ref[..., None], out[..., None]
    vals = []
    for c in range(ref.shape[2]):
        mse = np.mean((ref[..., c] - out[..., c]) ** 2)
        vals.append(10 * np.log10(255.0**2 / (mse + blocking_effect_factor(out[..., c]))))
    return float(np.mean(vals))


def image_metrics(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    return {"psnr": psnr(ref, out), "ssim": ssim(ref, out), "psnrb": psnrb(ref, out)}


# ---- torch versions for validation during training (float NCHW in [0,1]) ----

def _quantize(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x.float().clamp(0, 1) * 255)


def psnr_torch(ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (N,) on the uint8 levels the protocol measures."""
    mse = (_quantize(ref) - _quantize(out)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0**2 / mse)


def _gaussian_window(channels: int, device) -> torch.Tensor:
    x = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    g = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, -1, -1).contiguous()


def ssim_torch(ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (N,), mean over channels and over the window-valid interior (as skimage)."""
    x, y = _quantize(ref).double(), _quantize(out).double()
    c = x.shape[1]
    win = _gaussian_window(c, x.device)
    mu_x, mu_y = F.conv2d(x, win, groups=c), F.conv2d(y, win, groups=c)
    sxx = F.conv2d(x * x, win, groups=c) - mu_x**2
    syy = F.conv2d(y * y, win, groups=c) - mu_y**2
    sxy = F.conv2d(x * y, win, groups=c) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * 255) ** 2, (SSIM_K2 * 255) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).float()
