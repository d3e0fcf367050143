"""Labelled image strips (original | JPEG | restored, each with its PSNR) for validation images,
evaluation and the README figure."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_pipeline.images import png_bytes

from .metrics.psnr import psnr


def font_size(panel_width: int) -> int:
    """Label font size: grows with the panel, so labels stay readable when a strip is shown scaled down."""
    return max(14, panel_width // 22)


def label_height(panel_width: int) -> int:
    return font_size(panel_width) + 10


def panel_strip(panels: list[tuple[str, np.ndarray]], scale: int = 1) -> Image.Image:
    """Images side by side, each under its label (nearest-neighbour upscaled by `scale`)."""
    h, w = panels[0][1].shape[0] * scale, panels[0][1].shape[1] * scale
    font = ImageFont.load_default(size=font_size(w))
    bar = label_height(w)
    canvas = Image.new("RGB", (w * len(panels), h + bar), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, img) in enumerate(panels):
        canvas.paste(Image.fromarray(img).convert("RGB").resize((w, h), Image.NEAREST), (i * w, bar))
        draw.text((i * w + 6, 4), label, fill="black", font=font)
    return canvas


def side_by_side(original: np.ndarray, jpeg: np.ndarray, restored: np.ndarray | None, title: str) -> bytes:
    """PNG: original | JPEG | restored, each labelled with its PSNR against the original."""
    panels = [(f"{title}  original", original), (f"JPEG {psnr(original, jpeg):.2f} dB", jpeg)]
    if restored is not None:
        panels.append((f"restored {psnr(original, restored):.2f} dB", restored))
    return png_bytes(np.asarray(panel_strip(panels)))
