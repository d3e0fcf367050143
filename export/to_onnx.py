"""Export a model checkpoint to ONNX and check it against PyTorch on real images.

    python export/to_onnx.py --checkpoint image_compression_model.pth --out model.onnx [--fp16]

Fully convolutional models get dynamic batch, height and width; the autoencoder (dense
bottleneck) exports at its tile size with a dynamic batch, and runners tile whole images.
Parity: LIVE1 (from --data-root / $JPEG_RESTORE_DATA_ROOT, else the embedded scikit-image
photographs) at JPEG q10, restored by PyTorch and by ONNX Runtime (CPU): max |difference| and PSNR.
"""
from __future__ import annotations

import argparse
import io
import logging
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # `python export/to_onnx.py`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data_pipeline.images import BadImage, atomic_write_bytes, jpeg_roundtrip, list_images, read_image  # noqa: E402
from data_pipeline.sources import DataError, dataset_dir, skimage_dir  # noqa: E402
from train.checkpoint import CheckpointError, load_model  # noqa: E402
from train.inference import image_to_tensor  # noqa: E402
from train.metrics import psnr, to_uint8  # noqa: E402

FP32_TOLERANCE, PSNR_TOLERANCE = 1e-4, 0.01


class _Tile(torch.nn.Module):
    """The autoencoder's fixed-size forward, the graph that gets exported."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_tile(x)


def export_onnx(checkpoint: Path | str, out: Path | str, fp16: bool = False) -> dict:
    """Writes the ONNX file atomically; returns what runners need to know (tile size, channels)."""
    model, meta = load_model(checkpoint)
    tile = getattr(model, "tile", 0)
    c = meta["channels"]
    if tile:
        module, example, dims = _Tile(model), torch.rand(2, c, tile, tile), {0: "batch"}
    else:
        module, example, dims = model, torch.rand(1, c, 67, 45), {0: "batch", 2: "height", 3: "width"}
    if fp16:
        module, example = module.half(), example.half()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), (example,), dynamo=True, input_names=["input"], output_names=["output"],
                                    dynamic_shapes={"x": dims}, verbose=False)
    import onnx

    proto = program.model_proto
    proto.doc_string = f"jpeg-restore {meta['arch']} {meta['kwargs']} mode={meta['mode']} tile={tile}"
    onnx.checker.check_model(proto, full_check=True)
    buf = io.BytesIO()
    onnx.save(proto, buf)
    atomic_write_bytes(out, buf.getvalue())
    return {"arch": meta["arch"], "channels": c, "mode": meta["mode"], "tile": tile, "fp16": fp16, "path": str(out)}


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


def check_parity(checkpoint: Path | str, onnx_path: Path | str, data_root: str | None = None, count: int = 3,
                 quality: int = 10) -> dict:
    from serve_bench.runners import OrtRunner, TorchRunner

    model, meta = load_model(checkpoint)
    torch_runner = TorchRunner(model)
    ort_runner = OrtRunner(onnx_path, tile=getattr(model, "tile", 0), overlap=getattr(model, "overlap", 16))
    source, images = parity_images(meta["mode"], data_root, count)
    rows = []
    for name, original in images:
        x = image_to_tensor(jpeg_roundtrip(original, quality), "cpu")
        a, b = torch_runner.restore(x).clamp(0, 1), ort_runner.restore(x).clamp(0, 1)
        rows.append({"image": name, "max_abs_diff": float((a - b).abs().max()),
                     "psnr_torch": psnr(original, to_uint8(a[0])), "psnr_onnx": psnr(original, to_uint8(b[0]))})
    worst = max(r["max_abs_diff"] for r in rows)
    dpsnr = max(abs(r["psnr_torch"] - r["psnr_onnx"]) for r in rows)
    return {"source": source, "quality": quality, "images": rows, "max_abs_diff": worst, "max_psnr_diff": dpsnr,
            "ok": worst <= FP32_TOLERANCE and dpsnr <= PSNR_TOLERANCE}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=Path("image_compression_model.pth"))
    ap.add_argument("--out", type=Path, help="ONNX file (default: the checkpoint's name with .onnx)")
    ap.add_argument("--fp16", action="store_true", help="export in fp16 (for GPU runtimes; no CPU parity check)")
    ap.add_argument("--data-root", help="for the parity check on LIVE1 (default: $JPEG_RESTORE_DATA_ROOT)")
    args = ap.parse_args(argv)
    out = args.out or args.checkpoint.with_suffix(".fp16.onnx" if args.fp16 else ".onnx")
    try:
        info = export_onnx(args.checkpoint, out, args.fp16)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {info['arch']} ({info['mode']}) to {out}: " +
          (f"input N x {info['channels']} x {info['tile']} x {info['tile']} (tiles)" if info["tile"]
           else f"input N x {info['channels']} x H x W (dynamic)") + ", onnx.checker passed")
    if args.fp16:
        print("fp16 model: parity is checked on GPU runtimes (to_trt.py), not on the CPU provider")
        return 0
    p = check_parity(args.checkpoint, out, args.data_root)
    for r in p["images"]:
        print(f"  {r['image']:<16} max|torch-onnx| {r['max_abs_diff']:.2e}  PSNR torch {r['psnr_torch']:.3f} onnx {r['psnr_onnx']:.3f} dB")
    verdict = "passed" if p["ok"] else "FAILED"
    print(f"parity on {p['source']} q{p['quality']}: max abs diff {p['max_abs_diff']:.2e} (<= {FP32_TOLERANCE:g}), "
          f"PSNR diff {p['max_psnr_diff']:.4f} dB (<= {PSNR_TOLERANCE}): {verdict}")
    return 0 if p["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
