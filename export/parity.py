"""Parity of an exported model's runner with PyTorch eager fp32 on real images: LIVE1 (from the
data root) at JPEG q10, else the photographs embedded in scikit-image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data_pipeline.images import BadImage, jpeg_roundtrip, list_images, read_image
from data_pipeline.sources import DataError, dataset_dir, skimage_dir
from runtime.checkpoint import load_model
from runtime.inference import image_to_tensor, is_conditioned, to_uint8, with_quality
from runtime.metrics.psnr import psnr
from runtime.runners.torch_eager import TorchRunner

FP32_TOLERANCE, PSNR_TOLERANCE = 1e-4, 0.01
# half-precision graphs and engines (10 mantissa bits): within one 8-bit level, 0.05 dB
FP16_TOLERANCE, FP16_PSNR_TOLERANCE = 1 / 255, 0.05


def parity_images(mode: str, data_root: str | None, count: int = 3) -> tuple[str, list[tuple[str, np.ndarray]]]:
    """Real test images: LIVE1 in the model's mode, else the embedded scikit-image photographs."""
    try:
        folder, source = dataset_dir("live1_color" if mode == "rgb" else "live1_gray", data_root), "LIVE1"
    except DataError:
        folder, source = skimage_dir(), "scikit-image (no data root)"
    images = []
    for path in list_images(folder):
        try:
            images.append((path.stem, read_image(path, mode, min_size=64)))
        except (BadImage, OSError):
            continue
        if len(images) == count:
            break
    return source, images


def parity(checkpoint: Path | str, runner, data_root: str | None = None, count: int = 3, quality: int = 10,
           fp16: bool = False) -> dict:
    """An exported file's runner (on its own device) against PyTorch eager fp32 on the CPU, on real
    images at JPEG `quality`: max |difference| and PSNR of each; ok within the fp32 tolerances, or
    the fp16 ones for a half-precision graph or engine."""
    model, meta = load_model(checkpoint)
    torch_runner = TorchRunner(model)
    source, images = parity_images(meta["mode"], data_root, count)
    rows = []
    for name, original in images:
        x = image_to_tensor(jpeg_roundtrip(original, quality), "cpu")
        x = with_quality(x, quality) if is_conditioned(meta) else x  # a quality-conditioned model
        with torch.inference_mode():
            a, b = torch_runner.restore(x).clamp(0, 1), runner.restore(x.to(runner.device)).clamp(0, 1).cpu()
        rows.append({"image": name, "max_abs_diff": float((a - b).abs().max()),
                     "psnr_torch": psnr(original, to_uint8(a[0])), "psnr_export": psnr(original, to_uint8(b[0]))})
    worst = max(r["max_abs_diff"] for r in rows)
    dpsnr = max(abs(r["psnr_torch"] - r["psnr_export"]) for r in rows)
    tolerance, psnr_tolerance = (FP16_TOLERANCE, FP16_PSNR_TOLERANCE) if fp16 else (FP32_TOLERANCE, PSNR_TOLERANCE)
    return {"source": source, "quality": quality, "images": rows, "max_abs_diff": worst, "max_psnr_diff": dpsnr,
            "tolerance": tolerance, "psnr_tolerance": psnr_tolerance, "ok": worst <= tolerance and dpsnr <= psnr_tolerance}


def parity_report(p: dict, name: str) -> str:
    """The parity result as printed by the export commands: one line per image and a verdict."""
    lines = [f"  {r['image']:<16} max|torch-{name}| {r['max_abs_diff']:.2e}  PSNR torch {r['psnr_torch']:.3f} "
             f"{name} {r['psnr_export']:.3f} dB" for r in p["images"]]
    lines.append(f"parity on {p['source']} q{p['quality']}: max abs diff {p['max_abs_diff']:.2e} (<= {p['tolerance']:.2g}), "
                 f"PSNR diff {p['max_psnr_diff']:.4f} dB (<= {p['psnr_tolerance']}): {'passed' if p['ok'] else 'FAILED'}")
    return "\n".join(lines)
