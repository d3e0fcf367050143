"""Latency of every available backend on one checkpoint: warm-up, then timed iterations
(CUDA events on GPU, perf_counter on CPU), p50/p90/p99, images/s and megapixels/s, at several
resolutions and batch sizes; JSON + a markdown table with each backend's speed-up over PyTorch
eager fp32.

    python -m serve_bench.benchmark --checkpoint image_compression_model.pth [--onnx model.onnx]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from data_pipeline.images import atomic_write_bytes, atomic_write_json
from train.checkpoint import CheckpointError, load_model
from train.inference import native_bf16
from train.models import macs_per_pixel

from .runners import RUNNERS, RunnerUnavailable, tensorrt_status

# (height, width, batch): 256² and 512² at batch 1 and 4, a LIVE1-sized image (768x512 landscape)
SHAPES = [(256, 256, 1), (256, 256, 4), (512, 512, 1), (512, 512, 4), (512, 768, 1)]
QUICK_SHAPES = [(256, 256, 1), (512, 512, 1)]


def time_runner(runner, x: torch.Tensor, warmup: int, iters: int) -> list[float]:
    """Seconds per call of `runner(x)` (the whole input in one call: no tiling)."""
    for _ in range(warmup):
        runner(x)
    times = []
    if runner.device.type == "cuda":
        x = x.to(runner.device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runner(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            runner(x)
            times.append(time.perf_counter() - t0)
    return times


ALL_BACKENDS = ("torch", "torch-compile", "onnxruntime", "tensorrt")


def build_runners(checkpoint: Path, onnx_path: Path | None, engines: dict[str, Path], device: str,
                  backends=ALL_BACKENDS) -> list[tuple[str, object]]:
    """(label, runner or the reason it is unavailable) for every backend variant."""
    model, meta = load_model(checkpoint)
    tile = getattr(model, "tile", 0)
    variants = [("torch fp32", "torch", dict(model=model, device=device)),
                ("torch bf16 NHWC", "torch", dict(model=load_model(checkpoint)[0], device=device, precision="bf16", channels_last=True)),
                ("torch.compile fp32", "torch-compile", dict(model=load_model(checkpoint)[0], device=device)),
                ("onnxruntime fp32", "onnxruntime", dict(onnx_path=onnx_path, device=device, tile=tile))]
    variants += [(f"tensorrt {p}", "tensorrt", dict(engine_path=path)) for p, path in engines.items()]
    out = []
    for label, name, kwargs in variants:
        if name not in backends:
            continue
        if kwargs.get("precision") == "bf16" and not native_bf16(torch.device(device)):
            out.append((label, f"bf16 is emulated on this {device} (no native bf16 kernels): fp32 is its fast path"))
            continue
        if name not in RUNNERS:
            out.append((label, "tensorrt" in name and tensorrt_status() or f"{name} is not installed"))
            continue
        try:
            out.append((label, RUNNERS[name](**kwargs)))
        except RunnerUnavailable as exc:
            out.append((label, str(exc)))
    if not engines and "tensorrt" in backends:
        out.append(("tensorrt", tensorrt_status() or "no engine built"))
    return out


def run_benchmark(checkpoint: Path, onnx_path: Path | None = None, engines: dict | None = None, device: str = "cpu",
                  shapes=SHAPES, warmup: int = 3, iters: int = 10, backends=ALL_BACKENDS) -> dict:
    model, meta = load_model(checkpoint)
    rows, unavailable = [], {}
    runners = build_runners(checkpoint, onnx_path, engines or {}, device, backends)
    for h, w, n in shapes:
        x = torch.rand(n, meta["channels"], h, w)
        for label, runner in runners:
            if isinstance(runner, str):
                unavailable[label] = runner
                continue
            try:
                times = time_runner(runner, x, warmup, iters)
            except RunnerUnavailable as exc:
                unavailable[label] = str(exc)
                continue
            ms = np.array(times) * 1000
            mean = float(np.mean(times))
            rows.append({**runner.describe(), "backend": label, "height": h, "width": w, "batch": n,
                         "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
                         "p99_ms": float(np.percentile(ms, 99)), "images_per_s": n / mean, "mpixels_per_s": n * h * w / mean / 1e6})
    for r in rows:
        ref = next((b for b in rows if b["backend"] == "torch fp32" and (b["height"], b["width"], b["batch"]) == (r["height"], r["width"], r["batch"])), None)
        r["speedup_vs_torch"] = ref["p50_ms"] / r["p50_ms"] if ref else None
    macs = macs_per_pixel(model, meta["channels"])
    for r in rows:
        r["gflops"] = 2 * macs * r["mpixels_per_s"] * 1e6 / 1e9
    return {"checkpoint": str(checkpoint), "arch": meta["arch"], "kwargs": meta["kwargs"], "macs_per_pixel": macs,
            "matmul_peak_gflops": matmul_peak(device), "system": system_info(), "rows": rows, "unavailable": unavailable}


def _matmul_rate(n: int, dtype: torch.dtype, device: str, reps: int) -> float:
    a, b = torch.rand(n, n, device=device, dtype=dtype), torch.rand(n, n, device=device, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return reps * 2 * n**3 / (time.perf_counter() - t0) / 1e9


def matmul_peak(device: str = "cpu", n: int = 2048, budget_s: float = 3.0) -> dict[str, float]:
    """The machine's measured matmul GFLOP/s in fp32 and bf16: the yardstick for the rows' GFLOP/s.
    A dtype too slow to time at n within the budget (emulated bf16) is timed at 512."""
    peak = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rate = _matmul_rate(512, dtype, device, reps=1)
        fits = 5 * 2 * n**3 / (rate * 1e9) <= budget_s
        peak[name] = _matmul_rate(n, dtype, device, reps=5) if fits else rate
    return peak


def system_info() -> dict:
    info = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    for name in ("onnxruntime", "tensorrt", "onnx"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def markdown_table(result: dict) -> str:
    lines = [f"Latency of {result['arch']} ({result['macs_per_pixel'] / 1e3:.0f} k MACs/pixel); "
             f"{result['system']['cpu']} x{result['system']['cpu_count']}, GPU: {result['system']['cuda'] or 'none'}; "
             f"measured matmul peak {result['matmul_peak_gflops']['fp32']:.0f} GFLOP/s fp32, "
             f"{result['matmul_peak_gflops']['bf16']:.0f} bf16", "",
             "| backend | input | p50 ms | p90 ms | p99 ms | images/s | MP/s | GFLOP/s | vs torch fp32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        speed = f"{r['speedup_vs_torch']:.2f}x" if r["speedup_vs_torch"] else "-"
        lines.append(f"| {r['backend']} | {r['batch']}x{r['height']}x{r['width']} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r['images_per_s']:.2f} | {r['mpixels_per_s']:.2f} | {r['gflops']:.0f} | {speed} |")
    for label, why in result["unavailable"].items():
        lines.append(f"| {label} | not measured: {why} | | | | | | | |")
    return "\n".join(lines)


def log_to_mlflow(result: dict, run_id: str | None, files: list[Path]) -> str:
    if not run_id:
        return "not logged to MLflow: the checkpoint names no run"
    import mlflow

    from train.tracking import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri())
    client = mlflow.MlflowClient()
    try:
        stamp = int(time.time() * 1000)
        metrics = [mlflow.entities.Metric(f"latency_p50_ms_{r['backend'].replace(' ', '_').replace('.', '_')}_{r['batch']}x{r['height']}x{r['width']}",
                                          r["p50_ms"], stamp, 0) for r in result["rows"]]
        client.log_batch(run_id, metrics)
        for f in files:
            client.log_artifact(run_id, str(f), "latency")
    except Exception as exc:  # noqa: BLE001 - a store without that run
        return f"not logged to MLflow run {run_id}: {str(exc).splitlines()[0]}"
    return f"logged latency to MLflow run {run_id}"


def report(result: dict, out_dir: Path, run_id: str | None, log_mlflow: bool = True) -> str:
    table = markdown_table(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "latency.json", result)
    atomic_write_bytes(out_dir / "latency.md", (table + "\n").encode())
    msg = log_to_mlflow(result, run_id, [out_dir / "latency.json", out_dir / "latency.md"]) if log_mlflow else ""
    return table + f"\n\nwrote {out_dir / 'latency.json'} and {out_dir / 'latency.md'}" + (f"; {msg}" if msg else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=Path("image_compression_model.pth"))
    ap.add_argument("--onnx", type=Path, help="ONNX model (default: next to the checkpoint, exported if missing)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="256² and 512² at batch 1 only")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--backends", default=",".join(ALL_BACKENDS), help="comma-separated subset of " + ",".join(ALL_BACKENDS))
    ap.add_argument("--out", type=Path, default=Path("outputs/latency"))
    ap.add_argument("--no-mlflow", action="store_true")
    args = ap.parse_args(argv)
    try:
        _, meta = load_model(args.checkpoint)
        onnx_path = args.onnx or args.checkpoint.with_suffix(".onnx")
        if not onnx_path.is_file():
            from export.to_onnx import export_onnx

            export_onnx(args.checkpoint, onnx_path)
        result = run_benchmark(args.checkpoint, onnx_path, device=args.device,
                               shapes=QUICK_SHAPES if args.quick else SHAPES, iters=args.iters,
                               backends=args.backends.split(","))
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report(result, args.out, meta.get("mlflow_run_id"), not args.no_mlflow))
    return 0


if __name__ == "__main__":
    sys.exit(main())
