"""Labelled image strips (original | JPEG | restored, each with its PSNR) for validation images,
evaluation and the README figure."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_pipeline.images import MAX_PIXELS, png_bytes

from .metrics.psnr import psnr

STRIP_PIXELS = MAX_PIXELS // 2  # the size from which Pillow warns of a decompression bomb


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


def side_by_side(original: np.ndarray, jpeg: np.ndarray, restored: np.ndarray | None, title: str,
                 max_pixels: int = STRIP_PIXELS) -> bytes:
    """PNG: original | JPEG | restored, each labelled with its PSNR against the original (the whole
    image's). A strip over max_pixels shows the centre of each image, on the JPEG's 8x8 grid."""
    images = [original, jpeg] + ([restored] if restored is not None else [])
    labels = [f"{title}  original", f"JPEG {psnr(original, jpeg):.2f} dB"]
    if restored is not None:
        labels.append(f"restored {psnr(original, restored):.2f} dB")
    h, w = original.shape[:2]
    ch, cw = centre_size(h, w, len(images), max_pixels)
    if (ch, cw) != (h, w):
        y, x = (h - ch) // 16 * 8, (w - cw) // 16 * 8
        images = [img[y:y + ch, x:x + cw] for img in images]
        labels[0] += f"  (centre {cw}x{ch} of {w}x{h})"
    return png_bytes(np.asarray(panel_strip(list(zip(labels, images)))))


def centre_size(h: int, w: int, panels: int, max_pixels: int) -> tuple[int, int]:
    """The largest crop of an h x w image, in whole 8x8 blocks, whose strip of `panels` (labels
    included) stays within max_pixels; the whole image where it does."""
    ch, cw, shrink = h, w, 1.0
    while panels * cw * (ch + label_height(cw)) > max_pixels and (ch, cw) != (8, 8):
        shrink *= 0.98
        ch, cw = max(8, int(h * shrink) // 8 * 8), max(8, int(w * shrink) // 8 * 8)
    return ch, cw
