"""Compile a model checkpoint into an AOTInductor package (.pt2) and check it against PyTorch.

    python export/to_aoti.py --checkpoint image_compression_model.pth [--device cpu|cuda] [--out x.pt2]

The package runs without the model's Python code (torch._inductor.aoti_load_package), with
dynamic batch, height and width; the compile time is reported apart. Parity as for ONNX: LIVE1
at q10 when a data root is given, else the embedded scikit-image photographs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python export/to_aoti.py`
    sys.path[0] = str(Path(__file__).resolve().parents[1])


from data_pipeline.errors import command  # noqa: E402
from data_pipeline.images import output_file  # noqa: E402
from data_pipeline.system import keep_freed_memory  # noqa: E402
from export.aoti_export import export_aoti  # noqa: E402
from export.artifacts import pt2_path  # noqa: E402
from export.parity import parity, parity_report  # noqa: E402
from runtime.device import add_device_option, check_device  # noqa: E402
from runtime.inference import SHIPPED_GRAY, SHIPPED_HELP  # noqa: E402
from runtime.mlflow_store import checkpoint_path  # noqa: E402
from runtime.runners import make_runner  # noqa: E402


@command
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=checkpoint_path, default=SHIPPED_GRAY, help=SHIPPED_HELP)
    add_device_option(ap)
    ap.add_argument("--out", type=output_file, help="package (default: outputs/deploy/<checkpoint stem>-<SHA-256 prefix>.<device>.pt2)")
    ap.add_argument("--data-root", help="for the parity check on LIVE1 (default: $JPEG_RESTORE_DATA_ROOT)")
    args = ap.parse_args(argv)
    keep_freed_memory()
    args.device = check_device(args.device)
    out = args.out or pt2_path(args.checkpoint, args.device)
    info = export_aoti(args.checkpoint, out, args.device)
    print(f"compiled {info['arch']} ({info['mode']}) for {info['device']} into {out} in {info['compile_s']:.1f} s: "
          f"input N x {info['channels']} x H x W, H and W padded to multiples of {info['multiple']}")
    p = parity(args.checkpoint, make_runner("aoti", out, args.device), args.data_root)
    print(parity_report(p, "aoti"))
    return 0 if p["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
