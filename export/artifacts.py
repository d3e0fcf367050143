"""Where exported files live and when they are current: one place for the naming and the
staleness rule (the file's sidecar names the checkpoint's SHA-256), used by to_onnx, to_trt,
the latency benchmark and restore.

    outputs/deploy/<checkpoint stem>.onnx          + .onnx.json sidecar
    outputs/deploy/<checkpoint stem>.fp16.engine   + .fp16.engine.json (TensorRT FP16; .fp32 too)
    outputs/deploy/<checkpoint stem>.<cpu|cuda>.pt2 + .pt2.json (AOTInductor package, per device)
"""
from __future__ import annotations

from pathlib import Path

from runtime.artifacts import is_current
from runtime.runners import RunnerUnavailable

DEPLOY_DIR = Path("outputs/deploy")


def onnx_path(checkpoint: Path | str, deploy_dir: Path | str = DEPLOY_DIR) -> Path:
    return Path(deploy_dir) / f"{Path(checkpoint).stem}.onnx"


def engine_path(checkpoint: Path | str, precision: str, deploy_dir: Path | str = DEPLOY_DIR) -> Path:
    return Path(deploy_dir) / f"{Path(checkpoint).stem}.{precision}.engine"


def pt2_path(checkpoint: Path | str, device: str, deploy_dir: Path | str = DEPLOY_DIR) -> Path:
    return Path(deploy_dir) / f"{Path(checkpoint).stem}.{device.split(':')[0]}.pt2"


def ensure_pt2(checkpoint: Path | str, device: str, deploy_dir: Path | str = DEPLOY_DIR) -> Path:
    """The checkpoint's AOTInductor package for `device`, compiled now if missing or stale."""
    path = pt2_path(checkpoint, device, deploy_dir)
    if not is_current(path, checkpoint):
        from .aoti_export import export_aoti  # imported when needed: restore's default backend never exports
        export_aoti(checkpoint, path, device)
    return path


def ensure_onnx(checkpoint: Path | str, deploy_dir: Path | str = DEPLOY_DIR, fp16: bool = False) -> Path:
    """The checkpoint's ONNX file (fp32, or an fp16 graph for GPU runtimes), exported now if missing or stale."""
    path = onnx_path(Path(checkpoint).with_suffix(".fp16.pth") if fp16 else checkpoint, deploy_dir)
    if not is_current(path, checkpoint):
        from .onnx_export import export_onnx
        export_onnx(checkpoint, path, fp16)
    return path


def artifact_for(kind: str, checkpoint: Path | str, deploy_dir: Path | str = DEPLOY_DIR, options: dict | None = None,
                 device: str = "cpu") -> Path:
    """The file a runner of this artifact kind runs for `checkpoint` (see runtime.runners)."""
    if kind == "checkpoint":
        return Path(checkpoint)
    if kind == "onnx":
        return ensure_onnx(checkpoint, deploy_dir, (options or {}).get("precision") == "fp16")
    if kind == "pt2":
        return ensure_pt2(checkpoint, device, deploy_dir)
    if kind == "engine":
        path = engine_path(checkpoint, (options or {}).get("precision", "fp16"), deploy_dir)
        if not is_current(path, checkpoint):
            raise RunnerUnavailable(f"no current TensorRT engine for {checkpoint} at {path}: build it with "
                                    f"python export/to_trt.py --checkpoint {checkpoint} --out {deploy_dir}")
        return path
    raise ValueError(f"unknown artifact kind {kind!r}")
