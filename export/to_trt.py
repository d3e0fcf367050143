"""Deploy and measure: ONNX export (if needed) -> TensorRT engines (FP16 and FP32) -> parity on
real images -> the latency table of every available backend against PyTorch eager.

    python export/to_trt.py [--checkpoint image_compression_model.pth] [--quick]

Without an NVIDIA GPU or TensorRT it still exports, checks and benchmarks everything else, and
the table says that TensorRT was not measured and why. To measure the GPU design target
(TensorRT FP16 >= 3x PyTorch eager fp32) run the same command on a CUDA machine after
`pip install -e ".[tensorrt]"`. TensorRT was never measured by this project: its PyPI package
`tensorrt-cu13-libs` is a stub that downloads the real wheel from NVIDIA's own index at install
time, which our machines cannot reach, and Debian has no TensorRT package.

Files: <out>/<checkpoint stem>.onnx and .{fp16,fp32}.engine (each with a .json sidecar naming the
checkpoint it came from; `python -m serve_bench.restore --backend tensorrt` finds them there).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python export/to_trt.py`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from data_pipeline.errors import command  # noqa: E402
from data_pipeline.images import atomic_write_bytes, jpeg_roundtrip  # noqa: E402
from export.artifacts import DEPLOY_DIR, engine_path, ensure_onnx  # noqa: E402
from export.latency import default_shapes, parse_shapes, report, run_benchmark  # noqa: E402
from export.onnx_export import check_parity  # noqa: E402
from export.parity import parity_images  # noqa: E402
from runtime.artifacts import file_sha256, write_meta  # noqa: E402
from runtime.checkpoint import load_model  # noqa: E402
from runtime.inference import image_to_tensor, input_channels, to_uint8, with_quality  # noqa: E402
from runtime.metrics.psnr import psnr  # noqa: E402
from runtime.runners import make_runner, runners  # noqa: E402
from runtime.runners.torch_eager import TorchRunner  # noqa: E402

MIN_SIDE, OPT_SIDE, MAX_SIDE, MAX_BATCH = 64, 512, 1024, 4


def build_engine(onnx_path: Path, engine_path: Path, fp16: bool, channels: int, tile: int = 0,
                 timing_cache: Path | None = None, meta: dict | None = None) -> Path:
    """TensorRT 10 engine with one optimisation profile over batch, H and W (fixed at the tile size
    for the autoencoder); TF32 off in FP32 so that FP32 parity is meaningful; a timing cache file
    shared by builds."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 2 << 30)
    config.set_flag(trt.BuilderFlag.FP16) if fp16 else config.clear_flag(trt.BuilderFlag.TF32)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    lo, opt, hi = (tile, tile, tile) if tile else (MIN_SIDE, OPT_SIDE, MAX_SIDE)
    profile.set_shape("input", (1, channels, lo, lo), (1, channels, opt, opt), (MAX_BATCH, channels, hi, hi))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT engine build failed (see the TensorRT log above)")
    atomic_write_bytes(engine_path, bytes(serialized))
    write_meta(engine_path, {**(meta or {}), "precision": "fp16" if fp16 else "fp32"})
    if timing_cache:
        atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    return engine_path


def engine_parity(checkpoint: Path, engine_path: Path, data_root: str | None, quality: int = 10) -> dict:
    model, meta = load_model(checkpoint)
    ref, trt_runner = TorchRunner(model, device="cuda"), make_runner("tensorrt", engine_path, "cuda")
    source, images = parity_images(meta["mode"], data_root)
    diffs, dpsnr = [], []
    for _, original in images:
        x = image_to_tensor(jpeg_roundtrip(original, quality), "cuda")
        x = with_quality(x, quality) if input_channels(meta) > meta["channels"] else x
        a, b = ref.restore(x).clamp(0, 1), trt_runner.restore(x).clamp(0, 1)
        diffs.append(float((a - b).abs().max()))
        dpsnr.append(abs(psnr(original, to_uint8(a[0])) - psnr(original, to_uint8(b[0]))))
    return {"source": source, "max_abs_diff": max(diffs), "max_psnr_diff": max(dpsnr)}


@command
def main(argv=None) -> int:
    names = list(runners())
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=Path("image_compression_model.pth"))
    ap.add_argument("--out", type=Path, default=DEPLOY_DIR, help="ONNX, engines, timing cache, latency table")
    ap.add_argument("--data-root", help="for parity on LIVE1 (default: $JPEG_RESTORE_DATA_ROOT)")
    ap.add_argument("--quick", action="store_true", help="benchmark 256² and 512² at batch 1 only")
    ap.add_argument("--shapes", help="HxWxB,... (default: 256² and 512² at batch 1 and 4 and 512x768 on CPU; "
                    "256², 512², 1024² at batch 1 and 8 on GPU)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--backends", default=",".join(names), help="comma-separated subset of " + ",".join(names))
    ap.add_argument("--no-mlflow", action="store_true")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        shapes = parse_shapes(args.shapes) if args.shapes else default_shapes(device, args.quick)
    except ValueError as exc:
        ap.error(str(exc))
    _, meta = load_model(args.checkpoint)
    out = args.out
    onnx_path = ensure_onnx(args.checkpoint, out)
    p = check_parity(args.checkpoint, onnx_path, args.data_root)
    print(f"ONNX Runtime parity on {p['source']}: max abs diff {p['max_abs_diff']:.2e}, PSNR diff {p['max_psnr_diff']:.4f} dB: "
          + ("passed" if p["ok"] else "FAILED"))

    why_not = runners()["tensorrt"].unavailable("cuda")
    if why_not:
        print(f"TensorRT: not built and not measured: {why_not}")
    else:
        sidecar = {"checkpoint": str(args.checkpoint), "checkpoint_sha256": file_sha256(args.checkpoint), "arch": meta["arch"]}
        for precision in ("fp16", "fp32"):
            path = build_engine(onnx_path, engine_path(args.checkpoint, precision, out), precision == "fp16", input_channels(meta),
                                meta["kwargs"].get("tile", 0) if meta["arch"] == "autoencoder" else 0, out / "timing.cache",
                                sidecar)
            e = engine_parity(args.checkpoint, path, args.data_root)
            print(f"TensorRT {precision} engine {path}: max abs diff {e['max_abs_diff']:.2e}, PSNR diff {e['max_psnr_diff']:.4f} dB")
    result = run_benchmark(args.checkpoint, device, shapes, iters=args.iters,
                           backends=args.backends.split(","), deploy_dir=out)
    result["onnx_parity"] = p
    print(report(result, out, meta.get("mlflow_run_id"), not args.no_mlflow, record_dir=Path(args.checkpoint).parent))
    return 0 if p["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
