"""Whole-image inference with bounded memory, shared by validation, evaluation and restore."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from .models.common import tiled_forward

TILE, OVERLAP = 512, 32  # images larger than TILE run in overlapping tiles, one at a time
REPO = Path(__file__).resolve().parents[1]
SHIPPED_GRAY = REPO / "image_compression_model.pth"
SHIPPED_COLOR = REPO / "image_compression_model_color.pth"  # present only when an RGB model beats gray-on-luma


def shipped_model(color: bool) -> Path:
    """The default model: the shipped color model for color images when there is one, else the gray one."""
    return SHIPPED_COLOR if color and SHIPPED_COLOR.is_file() else SHIPPED_GRAY


def in_model_mode(restore: Callable[[np.ndarray], np.ndarray], mode: str, img: np.ndarray) -> np.ndarray:
    """Run a gray or RGB `restore` on an image of either kind: a gray model restores a color
    image's luma (Y of JPEG's own YCbCr) and keeps its chroma; an RGB model sees a gray image
    as three equal channels."""
    if img.ndim == 3 and mode == "gray":
        ycbcr = np.asarray(Image.fromarray(img).convert("YCbCr")).copy()
        ycbcr[..., 0] = restore(ycbcr[..., 0])
        return np.asarray(Image.fromarray(ycbcr, "YCbCr").convert("RGB"))
    if img.ndim == 2 and mode == "rgb":
        return restore(np.repeat(img[..., None], 3, axis=2))[..., 0]
    return restore(img)


def image_to_tensor(img: np.ndarray, device) -> torch.Tensor:
    """uint8 HxW or HxWx3 -> float 1xCxHxW in [0, 1]."""
    x = torch.tensor(img, device=device).float().div_(255)
    return x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]


def self_ensemble(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Mean of the model's outputs over the 8 rotations and flips of x, each turned back
    (geometric self-ensemble: 8x the compute, a small gain for free)."""
    total = torch.zeros_like(x, dtype=torch.float32)
    for k in range(4):
        for flip in (False, True):
            t = torch.rot90(x, k, (-2, -1))
            y = model(t.flip(-1) if flip else t).float()
            total += torch.rot90(y.flip(-1) if flip else y, -k, (-2, -1))
    return total / 8


def restore_tensor(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int = TILE,
                   overlap: int = OVERLAP, ensemble: bool = False) -> torch.Tensor:
    """model(x) on an NCHW batch; images with a side above `tile` go tile by tile;
    `ensemble` averages over the 8 rotations and flips of every tile."""
    fn = (lambda t: self_ensemble(model, t)) if ensemble else model
    if max(x.shape[-2:]) <= tile:
        return fn(x)
    return tiled_forward(fn, x, tile, overlap, max_tiles=1)


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 natively: CUDA with bf16 support, or a CPU with
    AVX-512 (BF16/AMX) kernels in oneDNN. Elsewhere bf16 is emulated and several times slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 where it is native, fp16 on CUDA without bf16, fp32 otherwise; others unchanged."""
    if precision != "auto":
        return precision
    if native_bf16(device):
        return "bf16"
    return "fp16" if device.type == "cuda" else "fp32"


def autocast_for(precision: str, device: torch.device):
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ValueError(f"train.precision must be auto, bf16, fp16 or fp32, got {precision!r}")
    return torch.autocast(device.type, dtype=dtype)


class Restorer:
    """A model checkpoint as a function: uint8 JPEG-decoded image -> uint8 restored image."""

    def __init__(self, checkpoint: Path | str, device: str = "cpu", precision: str = "fp32", ensemble: bool = False):
        from .checkpoint import load_model

        self.device = torch.device(device)
        self.model, self.meta = load_model(checkpoint, self.device)
        self.model.to(self.device)
        self.mode, self.autocast = self.meta["mode"], lambda: autocast_for(precision, self.device)
        self.ensemble = ensemble

    def __call__(self, img: np.ndarray) -> np.ndarray:
        return in_model_mode(self._restore, self.mode, img)

    @torch.no_grad()
    def _restore(self, img: np.ndarray) -> np.ndarray:
        with self.autocast():
            y = restore_tensor(self.model, image_to_tensor(img, self.device), ensemble=self.ensemble)
        y = y.float().clamp_(0, 1).mul_(255).round_().to(torch.uint8)[0].cpu()
        return y[0].numpy() if y.shape[0] == 1 else y.permute(1, 2, 0).numpy()
