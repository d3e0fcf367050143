"""Latency of every registered runner and its variants on one checkpoint: warm-up (the first
call, compile included, is reported apart), then timed iterations (CUDA events on GPU,
perf_counter on CPU), p50/p90/p99, images/s from the median and megapixels/s, at several
resolutions and batch sizes; JSON + a markdown table with each row's device and provider and its
speed-up over PyTorch eager fp32. Commands: `python -m serve_bench.benchmark`, `python export/to_trt.py`."""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data_pipeline.errors import UserError
from data_pipeline.images import atomic_write_bytes, atomic_write_json
from runtime.checkpoint import load_model
from runtime.device import cpu_model, matmul_peak
from runtime.inference import input_channels
from runtime.mlflow_store import latency_metric, log_to_run
from runtime.models import macs_per_pixel
from runtime.runners import RunnerUnavailable, make_runner, runners

from .artifacts import DEPLOY_DIR, artifact_for

# (height, width, batch): 256² and 512² at batch 1 and 4, a LIVE1-sized image (768x512 landscape)
SHAPES = [(256, 256, 1), (256, 256, 4), (512, 512, 1), (512, 512, 4), (512, 768, 1)]
QUICK_SHAPES = [(256, 256, 1), (512, 512, 1)]
GPU_SHAPES = [(256, 256, 1), (256, 256, 8), (512, 512, 1), (512, 512, 8), (1024, 1024, 1), (1024, 1024, 8)]


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """'512x512x8,1024x1024x1' -> [(512, 512, 8), (1024, 1024, 1)] (height x width x batch)."""
    try:
        shapes = [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise ValueError(f"--shapes takes HxWxB items separated by commas, e.g. 512x512x1,512x512x8; got {text!r}")
    return shapes


def default_shapes(device: str, quick: bool = False) -> list[tuple[int, int, int]]:
    return QUICK_SHAPES if quick else GPU_SHAPES if device.startswith("cuda") else SHAPES


def add_benchmark_args(ap) -> None:
    """The latency table's options, shared by `serve_bench.benchmark` and `export/to_trt.py`."""
    names = ",".join(runners())
    ap.add_argument("--quick", action="store_true", help="256² and 512² at batch 1 only")
    ap.add_argument("--shapes", help="HxWxB,... (default: 256² and 512² at batch 1 and 4 and 512x768 on CPU; "
                    "256², 512², 1024² at batch 1 and 8 on GPU)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--backends", default=names, help="comma-separated subset of " + names)
    ap.add_argument("--no-mlflow", action="store_true")


def benchmark_choices(args, device: str) -> tuple[list[tuple[int, int, int]], list[str]]:
    """(shapes, backends) asked for by add_benchmark_args' options; a bad one is a one-line UserError."""
    backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(backends) - set(runners()))
    if unknown or not backends:
        raise UserError((f"unknown backend {unknown[0]!r}" if unknown else "--backends names none")
                        + f"; known: {', '.join(runners())}")
    if args.iters < 1:
        raise UserError(f"--iters must be at least 1, got {args.iters}")
    try:
        shapes = parse_shapes(args.shapes) if args.shapes else default_shapes(device, args.quick)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return shapes, backends


def time_runner(runner, x: torch.Tensor, warmup: int, iters: int) -> tuple[float, list[float]]:
    """(seconds of the first call, compile included; seconds per timed call) of `runner(x)`,
    the whole input in one call (no tiling)."""
    if runner.device.type == "cuda":
        x = x.to(runner.device)
    t0 = time.perf_counter()
    runner(x)
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        runner(x)
    times = []
    if runner.device.type == "cuda":
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
    return first, times


def build_runners(checkpoint: Path, device: str, deploy_dir: Path = DEPLOY_DIR, backends=None) -> list[tuple[str, object]]:
    """(label, runner or the reason it is not timed) for every variant of every registered runner."""
    out = []
    for name, cls in runners().items():
        if backends is not None and name not in backends:
            continue
        why = cls.unavailable(device)
        for label, options in cls.variants(device):
            if why or isinstance(options, str):
                out.append((label, why or options))
                continue
            try:
                path = artifact_for(cls.artifact, checkpoint, deploy_dir, options, device)
                out.append((label, make_runner(name, path, device, **options)))
            except RunnerUnavailable as exc:
                out.append((label, str(exc)))
    return out


def run_benchmark(checkpoint: Path, device: str = "cpu", shapes=SHAPES, warmup: int = 3, iters: int = 10,
                  backends=None, deploy_dir: Path = DEPLOY_DIR) -> dict:
    model, meta = load_model(checkpoint)
    rows, unavailable = [], {}
    built = build_runners(checkpoint, device, deploy_dir, backends)
    timed = sum(not isinstance(runner, str) for _, runner in built)
    with tqdm(total=len(shapes) * timed, unit="variant", leave=False, disable=not sys.stderr.isatty()) as bar:  # none in a log
        for h, w, n in shapes:
            x = torch.rand(n, input_channels(meta), h, w)
            for label, runner in built:
                if isinstance(runner, str):
                    unavailable[label] = runner
                    continue
                bar.set_description(f"{label} {n}x{h}x{w}")
                try:
                    first, times = time_runner(runner, x, warmup, iters)
                except RunnerUnavailable as exc:
                    unavailable[label] = str(exc)
                    continue
                finally:
                    bar.update()
                ms = np.array(times) * 1000
                median = float(np.median(times))
                rows.append({**runner.describe(), "backend": label, "height": h, "width": w, "batch": n, "first_call_s": first,
                             "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
                             "p99_ms": float(np.percentile(ms, 99)), "images_per_s": n / median, "mpixels_per_s": n * h * w / median / 1e6})
    for r in rows:
        ref = next((b for b in rows if b["backend"] == "torch fp32" and (b["height"], b["width"], b["batch"]) == (r["height"], r["width"], r["batch"])), None)
        r["speedup_vs_torch"] = ref["p50_ms"] / r["p50_ms"] if ref else None
    macs = macs_per_pixel(model, input_channels(meta))
    for r in rows:
        r["gflops"] = 2 * macs * r["mpixels_per_s"] * 1e6 / 1e9
    return {"checkpoint": str(checkpoint), "arch": meta["arch"], "kwargs": meta["kwargs"], "macs_per_pixel": macs,
            "matmul_peak_gflops": matmul_peak(device), "system": system_info(), "rows": rows, "unavailable": unavailable}


def system_info() -> dict:
    info = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "cpu": cpu_model(), "python": platform.python_version(),
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
             f"measured peak {result['matmul_peak_gflops']['fp32']:.0f} GFLOP/s fp32, "
             f"{result['matmul_peak_gflops']['bf16']:.0f} bf16", "",
             "| backend | device / provider | input | first call s | p50 ms | p90 ms | p99 ms | images/s | MP/s | GFLOP/s | vs torch fp32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        speed = f"{r['speedup_vs_torch']:.2f}x" if r["speedup_vs_torch"] else "-"
        where = r["device"] + (f" / {r['provider']}" if r.get("provider") else "")
        label = r["backend"] + (f" (compiled in {r['compile_s']:.0f} s)" if r.get("compile_s") else "")
        lines.append(f"| {label} | {where} | {r['batch']}x{r['height']}x{r['width']} | {r['first_call_s']:.2f} | "
                     f"{r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['images_per_s']:.2f} | "
                     f"{r['mpixels_per_s']:.2f} | {r['gflops']:.0f} | {speed} |")
    for label, why in result["unavailable"].items():
        lines.append(f"| {label} | not measured: {why} | | | | | | | | | |")
    return "\n".join(lines)


def report(result: dict, out_dir: Path, run_id: str | None, log_mlflow: bool = True, record_dir: Path | None = None) -> str:
    table = markdown_table(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "latency.json", result)
    atomic_write_bytes(out_dir / "latency.md", (table + "\n").encode())
    metrics = {latency_metric(r["backend"], r["device"], r["batch"], r["height"], r["width"]): r["p50_ms"] for r in result["rows"]}
    msg = log_to_run(run_id, metrics, [out_dir / "latency.json", out_dir / "latency.md"], "latency",
                     record_dir) if log_mlflow else ""
    return table + f"\n\nwrote {out_dir / 'latency.json'} and {out_dir / 'latency.md'}" + (f"; {msg}" if msg else "")
