"""How many training steps of a config fit in SECONDS on this device: the bare loop's rate (compiled
when the config compiles; also its MFU against the measured matmul peak), less a margin for the Trainer's validation and
checkpoints. Prints one integer on the last line, for --set train.max_steps, so the cosine schedule
ends inside the time box instead of being cut off at a high learning rate.

    python scripts/gpu/steps_for.py 420 configs/nafnet_gpu.toml [--set data.batch_size=64 ...] [--json F]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[2])

import torch  # noqa: E402

from runtime.device import matmul_peak, resolve_precision  # noqa: E402
from runtime.models import build_model, macs_per_pixel  # noqa: E402
from train.benchmark import bare_loop_rate, training_tflops  # noqa: E402
from train.loop.config import load_config  # noqa: E402

MARGIN = 0.85  # the Trainer's share of the bare rate, with validation and checkpoints


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("seconds", type=float)
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(cfg.train.precision, device)
    channels = 1 if cfg.data.mode == "gray" else 3
    batch, patch = cfg.data.batch_size, cfg.data.patch_size
    rate = bare_loop_rate(cfg.model.arch, 30, device, batch, patch, cfg.model.kwargs, precision, cfg.train.compile, channels)
    macs = macs_per_pixel(build_model(cfg.model.arch, channels=channels, **cfg.model.kwargs), channels)
    tflops = training_tflops(rate, patch, macs)
    peak = matmul_peak(str(device))["bf16" if precision in ("bf16", "fp16") else "fp32"] / 1e3
    steps = int(args.seconds * MARGIN * rate / batch)
    row = {"arch": cfg.model.arch, "kwargs": cfg.model.kwargs, "mode": cfg.data.mode, "batch": batch, "patch": patch,
           "precision": precision, "compile": cfg.train.compile, "bare_patches_per_s": rate, "macs_per_pixel": macs,
           "tflops": tflops, "peak_tflops": peak, "mfu": tflops / peak, "seconds": args.seconds, "max_steps": steps,
           "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    print(f"{cfg.model.arch} {cfg.model.kwargs} {cfg.data.mode} {batch} x {patch}^2 ({precision}"
          f"{', compiled' if cfg.train.compile else ''}): {rate:.0f} patches/s bare, {tflops:.1f} TFLOP/s, "
          f"MFU {tflops / peak:.1%} of {peak:.1f}; {args.seconds:.0f} s -> {steps} steps")
    if args.json:
        args.json.write_text(json.dumps(row, indent=1))
    print(steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
