"""Where exported files live and when they are current: one place for the naming and the
staleness rule (the file's sidecar names the checkpoint's SHA-256), used by to_onnx, to_trt,
the latency benchmark and restore.

    outputs/deploy/<name>.onnx            + .onnx.json sidecar (.fp16.onnx: the fp16 graph)
    outputs/deploy/<name>.fp16.engine     + .fp16.engine.json (TensorRT FP16; .fp32 too)
    outputs/deploy/<name>.<cpu|cuda>.pt2  + .pt2.json (AOTInductor package, per device)
    outputs/latency/<name>/latency.json   + latency.md (the latency benchmark's table)

<name> is the checkpoint's stem and the first 8 hex digits of its SHA-256: every run's checkpoint
is called image_compression_model.pth, and a name from the stem alone let each checkpoint's
exports replace another's.
"""
from __future__ import annotations

from pathlib import Path

from runtime.artifacts import file_sha256, is_current
from runtime.checkpoint import CheckpointError
from runtime.runners import RunnerUnavailable

DEPLOY_DIR = Path("outputs/deploy")
LATENCY_DIR = Path("outputs/latency")


def artifact_name(checkpoint: Path | str) -> str:
    """`<stem>-<SHA-256 prefix>`: one checkpoint's exports, whatever folder it lies in."""
    if not Path(checkpoint).is_file():
        raise CheckpointError(f"checkpoint {checkpoint} not found")
    return f"{Path(checkpoint).stem}-{file_sha256(checkpoint)[:8]}"


def onnx_path(checkpoint: Path | str, deploy_dir: Path | str = DEPLOY_DIR, fp16: bool = False) -> Path:
    return Path(deploy_dir) / f"{artifact_name(checkpoint)}{'.fp16' if fp16 else ''}.onnx"


def engine_path(checkpoint: Path | str, precision: str, deploy_dir: Path | str = DEPLOY_DIR) -> Path:
    return Path(deploy_dir) / f"{artifact_name(checkpoint)}.{precision}.engine"


def pt2_path(checkpoint: Path | str, device: str, deploy_dir: Path | str = DEPLOY_DIR) -> Path:
    return Path(deploy_dir) / f"{artifact_name(checkpoint)}.{device.split(':')[0]}.pt2"


def latency_dir(checkpoint: Path | str) -> Path:
    return LATENCY_DIR / artifact_name(checkpoint)


def ensure_pt2(checkpoint: Path | str, device: str, deploy_dir: Path | str = DEPLOY_DIR) -> Path:
    """The checkpoint's AOTInductor package for `device`, compiled now if missing or stale."""
    path = pt2_path(checkpoint, device, deploy_dir)
    if not is_current(path, checkpoint):
        from .aoti_export import export_aoti  # imported when needed: restore's default backend never exports
        export_aoti(checkpoint, path, device)
    return path


def ensure_onnx(checkpoint: Path | str, deploy_dir: Path | str = DEPLOY_DIR, fp16: bool = False) -> Path:
    """The checkpoint's ONNX file (fp32, or an fp16 graph for GPU runtimes), exported now if missing or stale."""
    path = onnx_path(checkpoint, deploy_dir, fp16)
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
