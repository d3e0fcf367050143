"""Images in, images out: uint8 arrays <-> float tensors, gray models on color images, the shipped
models, and `Restorer` (a checkpoint as a function on uint8 images)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from data_pipeline.images import is_gray

from .checkpoint import load_model
from .device import autocast_for, inference_channels_last, resolve_precision
from .models import fold_batch_norm
from .tiling import restore_tensor

REPO = Path(__file__).resolve().parents[1]
SHIPPED_GRAY = REPO / "image_compression_model.pth"
SHIPPED_COLOR = REPO / "image_compression_model_color.pth"  # present only when an RGB model beats gray-on-luma
SHIPPED_HELP = ("a file, or a registered version: models:/NAME@ALIAS, models:/NAME/VERSION (default: the shipped gray model, "
                "image_compression_model.pth in the repository, wherever the command runs)")


def shipped_model(color: bool) -> Path:
    """The default model: the shipped color model for color images when there is one, else the gray one."""
    return SHIPPED_COLOR if color and SHIPPED_COLOR.is_file() else SHIPPED_GRAY


def in_model_mode(restore: Callable[[np.ndarray], np.ndarray], mode: str, img: np.ndarray) -> np.ndarray:
    """Run a gray or RGB `restore` on an image of either kind: a gray model restores a color
    image's luma (Y of JPEG's own YCbCr) and keeps its chroma, and a gray image stored as RGB as
    the gray image it is; an RGB model sees a gray image as three equal channels."""
    if img.ndim == 3 and mode == "gray" and is_gray(img):  # exact, where YCbCr would round
        return np.repeat(restore(np.ascontiguousarray(img[..., 0]))[..., None], 3, axis=2)
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


def input_channels(meta: dict) -> int:
    """Planes a checkpoint's model takes: the image's, plus the quality plane of a conditioned model."""
    return meta["channels"] + meta.get("kwargs", {}).get("cond_channels", 0)


def is_conditioned(meta: dict) -> bool:
    """Whether a checkpoint's model takes the JPEG quality as an extra input plane."""
    return input_channels(meta) > meta["channels"]


def trained_qualities(meta: dict) -> tuple[int, int] | None:
    """(lowest, highest) JPEG quality a checkpoint's model was trained on, from its saved config;
    None when the checkpoint does not say."""
    data = meta.get("config", {}).get("data")
    if not data:
        return None
    qualities = data["online_quality_range"] if data.get("online") else data["qualities"]
    return min(qualities), max(qualities)


def with_quality(x: torch.Tensor, quality: int | None) -> torch.Tensor:
    """x with the quality plane appended: the JPEG quality / 255 everywhere, 0 when unknown (blind),
    as the loaders make it from uint8 (quality) / 255."""
    return torch.cat([x, x.new_full((x.shape[0], 1, *x.shape[2:]), (quality or 0) / 255)], dim=1)


def to_uint8(img: np.ndarray | torch.Tensor) -> np.ndarray:
    """Float [0,1] (HxW, HxWxC, or CxHxW tensor) -> rounded, clipped uint8 HxW[xC]."""
    if isinstance(img, torch.Tensor):  # rounded and clipped in torch a plane at a time: one plane's float copy
        planes = torch.empty(img.shape, dtype=torch.uint8, device=img.device)
        for plane, source in zip(planes, img.detach()):
            plane.copy_(source.float().mul(255.0).round_().clamp_(0, 255))
        return (planes[0] if planes.shape[0] == 1 else planes.permute(1, 2, 0)).contiguous().cpu().numpy()
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


class Restorer:
    """A model checkpoint as a function: uint8 JPEG-decoded image -> uint8 restored image."""

    def __init__(self, checkpoint: Path | str, device: str = "cpu", precision: str = "fp32", ensemble: bool = False):
        self.device = torch.device(device)
        self.model, self.meta = load_model(checkpoint, self.device)
        self.mode, self.precision = self.meta["mode"], resolve_precision(precision, self.device)  # 'auto' resolved
        if self.precision == "fp32":
            fold_batch_norm(self.model)
        layout = torch.channels_last if inference_channels_last(self.device) else torch.contiguous_format
        self.model.to(self.device, memory_format=layout)
        self.ensemble = ensemble
        self.conditioned = is_conditioned(self.meta)

    def __call__(self, img: np.ndarray, quality: int | None = None) -> np.ndarray:
        """The restored image; `quality` (the JPEG's, e.g. from its tables) feeds a quality-conditioned
        model, None runs it blind; models without the quality plane ignore it."""
        return in_model_mode(lambda a: self._restore(a, quality), self.mode, img)

    @torch.no_grad()
    def _restore(self, img: np.ndarray, quality: int | None) -> np.ndarray:
        x = image_to_tensor(img, self.device)
        if self.conditioned:
            x = with_quality(x, quality)
        with autocast_for(self.precision, self.device):
            y = restore_tensor(self.model, x, ensemble=self.ensemble)
        del x  # the input's float copy, before rounding the output needs memory (as restore does)
        return to_uint8(y[0])
