"""Latency of every available backend on one checkpoint (the measurement itself: export/latency.py).

    python -m serve_bench.benchmark --checkpoint image_compression_model.pth [--quick] [--backends torch,onnxruntime]

ONNX files are exported into --deploy-dir when missing or stale; TensorRT engines come from
`python export/to_trt.py`. Writes latency.json and latency.md (into outputs/latency/<checkpoint
stem>-<SHA-256 prefix>/ unless --out names a folder) and logs the p50 latencies to the checkpoint's
MLflow run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_pipeline.errors import command
from data_pipeline.system import keep_freed_memory
from export.artifacts import DEPLOY_DIR, latency_dir
from export.latency import add_benchmark_args, benchmark_choices, report, run_benchmark
from runtime.checkpoint import load_model
from runtime.device import add_device_option, check_device
from runtime.inference import SHIPPED_GRAY, SHIPPED_HELP
from runtime.mlflow_store import checkpoint_path


@command
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=checkpoint_path, default=SHIPPED_GRAY, help=SHIPPED_HELP)
    ap.add_argument("--deploy-dir", type=Path, default=DEPLOY_DIR, help="exported ONNX files and TensorRT engines")
    add_device_option(ap)
    ap.add_argument("--out", type=Path, help="folder for latency.json and latency.md (default: outputs/latency/<checkpoint "
                    "stem>-<its SHA-256's first 8 hex digits>: each checkpoint keeps its own table)")
    add_benchmark_args(ap)
    args = ap.parse_args(argv)
    keep_freed_memory()  # as restore runs
    args.device = check_device(args.device)
    shapes, backends = benchmark_choices(args, args.device)
    _, meta = load_model(args.checkpoint)
    out = args.out or latency_dir(args.checkpoint)
    result = run_benchmark(args.checkpoint, args.device, shapes, iters=args.iters,
                           backends=backends, deploy_dir=args.deploy_dir)
    print(report(result, out, meta.get("mlflow_run_id"), not args.no_mlflow, record_dir=Path(args.checkpoint).parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
