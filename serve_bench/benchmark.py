"""Latency of every available backend on one checkpoint (the measurement itself: export/latency.py).

    python -m serve_bench.benchmark --checkpoint image_compression_model.pth [--quick] [--backends torch,onnxruntime]

ONNX files are exported into --deploy-dir when missing or stale; TensorRT engines come from
`python export/to_trt.py`. Writes latency.json and latency.md and logs the p50 latencies to the
checkpoint's MLflow run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from data_pipeline.errors import command
from export.artifacts import DEPLOY_DIR
from export.latency import default_shapes, parse_shapes, report, run_benchmark
from runtime.checkpoint import load_model
from runtime.runners import runners


@command
def main(argv=None) -> int:
    names = list(runners())
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=Path("image_compression_model.pth"))
    ap.add_argument("--deploy-dir", type=Path, default=DEPLOY_DIR, help="exported ONNX files and TensorRT engines")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="256² and 512² at batch 1 only")
    ap.add_argument("--shapes", help="HxWxB,... (default: 256² and 512² at batch 1 and 4 and 512x768 on CPU; "
                    "256², 512², 1024² at batch 1 and 8 on GPU)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--backends", default=",".join(names), help="comma-separated subset of " + ",".join(names))
    ap.add_argument("--out", type=Path, default=Path("outputs/latency"))
    ap.add_argument("--no-mlflow", action="store_true")
    args = ap.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(backends) - set(names))
    if unknown:
        ap.error(f"unknown backend {unknown[0]!r}; known: {', '.join(names)}")
    try:
        shapes = parse_shapes(args.shapes) if args.shapes else default_shapes(args.device, args.quick)
    except ValueError as exc:
        ap.error(str(exc))
    _, meta = load_model(args.checkpoint)
    result = run_benchmark(args.checkpoint, args.device, shapes, iters=args.iters,
                           backends=backends, deploy_dir=args.deploy_dir)
    print(report(result, args.out, meta.get("mlflow_run_id"), not args.no_mlflow, record_dir=Path(args.checkpoint).parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
