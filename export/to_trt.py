"""Deploy and measure: ONNX export (if needed) -> TensorRT engines (FP16 and FP32) -> parity on
real images -> the latency table of every available backend against PyTorch eager.

    python export/to_trt.py [--checkpoint image_compression_model.pth] [--quick]

Without an NVIDIA GPU or TensorRT it still exports, checks and benchmarks everything else, and
the table says that TensorRT was not measured and why. To measure the GPU design target
(TensorRT FP16 >= 3x PyTorch eager fp32) run the same command on a CUDA machine after
`pip install -e ".[tensorrt]"`. TensorRT was never measured by this project: its PyPI package
`tensorrt-cu13-libs` is a stub that downloads the real wheel from NVIDIA's own index at install
time, which our machines cannot reach, and Debian has no TensorRT package.

Files: outputs/deploy/<checkpoint stem>-<SHA-256 prefix>.onnx and .{fp16,fp32}.engine (each with a
.json sidecar naming the checkpoint it came from; `python -m serve_bench.restore --backend
tensorrt` finds them there) and the latency table in outputs/latency/<the same name>/, as
serve_bench.benchmark writes it; --out puts all of them in one folder.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python export/to_trt.py`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from data_pipeline.errors import command  # noqa: E402
from data_pipeline.images import atomic_write_bytes  # noqa: E402
from data_pipeline.system import keep_freed_memory  # noqa: E402
from export.artifacts import DEPLOY_DIR, engine_path, ensure_onnx, latency_dir  # noqa: E402
from export.latency import add_benchmark_args, benchmark_choices, report, run_benchmark  # noqa: E402
from export.onnx_export import check_parity  # noqa: E402
from export.parity import parity, parity_report  # noqa: E402
from runtime.artifacts import check_replaceable, file_sha256, write_meta  # noqa: E402
from runtime.checkpoint import load_model  # noqa: E402
from runtime.inference import SHIPPED_GRAY, SHIPPED_HELP, input_channels  # noqa: E402
from runtime.mlflow_store import checkpoint_path  # noqa: E402
from runtime.runners import make_runner, runners  # noqa: E402

MIN_SIDE, OPT_SIDE, MAX_SIDE, MAX_BATCH = 64, 512, 1024, 4


def build_engine(onnx_path: Path, engine_path: Path, fp16: bool, channels: int, tile: int = 0,
                 timing_cache: Path | None = None, meta: dict | None = None) -> Path:
    """TensorRT 10 engine with one optimisation profile over batch, H and W (fixed at the tile size
    for the autoencoder); TF32 off in FP32 so that FP32 parity is meaningful; a timing cache file
    shared by builds."""
    check_replaceable(engine_path)
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


def ort_cuda_parity(checkpoint: Path, deploy_dir: Path, data_root: str | None) -> list[dict]:
    """ONNX Runtime's CUDA provider (IO binding) on the fp32 and fp16 graphs against PyTorch; [] without it."""
    checks = []
    for fp16 in (False, True):
        runner = make_runner("onnxruntime", ensure_onnx(checkpoint, deploy_dir, fp16), "cuda")
        if runner.provider == "CPUExecutionProvider":
            return []
        checks.append({**parity(checkpoint, runner, data_root, fp16=fp16), "provider": runner.provider,
                       "graph": "fp16" if fp16 else "fp32"})
    return checks


@command
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=checkpoint_path, default=SHIPPED_GRAY, help=SHIPPED_HELP)
    ap.add_argument("--out", type=Path, help="one folder for the ONNX file, engines, timing cache and latency table "
                    "(default: outputs/deploy, the table in outputs/latency/<checkpoint stem>-<SHA-256 prefix>)")
    ap.add_argument("--data-root", help="for parity on LIVE1 (default: $JPEG_RESTORE_DATA_ROOT)")
    add_benchmark_args(ap)
    args = ap.parse_args(argv)
    keep_freed_memory()  # as restore runs
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes, backends = benchmark_choices(args, device)
    _, meta = load_model(args.checkpoint)
    out = args.out or DEPLOY_DIR
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
            e = parity(args.checkpoint, make_runner("tensorrt", path, "cuda"), args.data_root, fp16=precision == "fp16")
            print(f"TensorRT {precision} engine {path}: " + parity_report(e, "trt").splitlines()[-1])
    gpu_checks = ort_cuda_parity(args.checkpoint, out, args.data_root) if device == "cuda" else []
    for g in gpu_checks:
        print(f"ONNX Runtime {g['provider']} {g['graph']} graph: " + parity_report(g, "ort").splitlines()[-1])
    if device == "cuda" and not gpu_checks:
        print("ONNX Runtime on CUDA: not checked: this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)")
    result = run_benchmark(args.checkpoint, device, shapes, iters=args.iters,
                           backends=backends, deploy_dir=out)
    result["onnx_parity"], result["onnx_cuda_parity"] = p, gpu_checks
    print(report(result, args.out or latency_dir(args.checkpoint), meta.get("mlflow_run_id"), not args.no_mlflow, record_dir=Path(args.checkpoint).parent))
    return 0 if p["ok"] and all(g["ok"] for g in gpu_checks) else 1


if __name__ == "__main__":
    sys.exit(main())
