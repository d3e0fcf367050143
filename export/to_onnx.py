"""Export a model checkpoint to ONNX and check it against PyTorch on real images.

    python export/to_onnx.py --checkpoint image_compression_model.pth [--out outputs/deploy/x.onnx] [--fp16]

Fully convolutional models get dynamic batch, height and width; the autoencoder (dense
bottleneck) exports at its tile size with a dynamic batch, and runners tile whole images.
Parity: LIVE1 (from --data-root / $JPEG_RESTORE_DATA_ROOT, else the embedded scikit-image
photographs) at JPEG q10, restored by PyTorch and by ONNX Runtime (CPU): max |difference| and PSNR.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python export/to_onnx.py`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from data_pipeline.errors import command  # noqa: E402
from data_pipeline.images import output_file  # noqa: E402
from data_pipeline.system import keep_freed_memory  # noqa: E402
from export.artifacts import onnx_path  # noqa: E402
from export.onnx_export import check_parity, export_onnx  # noqa: E402
from export.parity import parity_report  # noqa: E402
from runtime.inference import SHIPPED_GRAY, SHIPPED_HELP  # noqa: E402
from runtime.mlflow_store import checkpoint_path  # noqa: E402


@command
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=checkpoint_path, default=SHIPPED_GRAY, help=SHIPPED_HELP)
    ap.add_argument("--out", type=output_file, help="ONNX file (default: outputs/deploy/<checkpoint stem>-<SHA-256 prefix>[.fp16].onnx)")
    ap.add_argument("--fp16", action="store_true", help="export in fp16 (for GPU runtimes; no CPU parity check)")
    ap.add_argument("--data-root", help="for the parity check on LIVE1 (default: $JPEG_RESTORE_DATA_ROOT)")
    args = ap.parse_args(argv)
    keep_freed_memory()
    out = args.out or onnx_path(args.checkpoint, fp16=args.fp16)
    info = export_onnx(args.checkpoint, out, args.fp16)
    print(f"exported {info['arch']} ({info['mode']}) to {out}: " +
          (f"input N x {info['channels']} x {info['tile']} x {info['tile']} (tiles)" if info["tile"]
           else f"input N x {info['channels']} x H x W (dynamic)") + ", onnx.checker passed")
    if args.fp16:
        print("fp16 model: parity is checked on GPU runtimes (to_trt.py), not on the CPU provider")
        return 0
    p = check_parity(args.checkpoint, out, args.data_root)
    print(parity_report(p, "onnx"))
    return 0 if p["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
