"""Checkpoints, always written atomically and read with torch.load(weights_only=True).

- Model checkpoint (`image_compression_model.pth`): weights + arch + kwargs + channel mode +
  training config + validation metrics; enough to rebuild the model anywhere (export, restore).
- Training state (`<out>/checkpoints/step_XXXXXXXX.pt`): everything `--resume` needs.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import torch
from torch import nn

from data_pipeline.images import atomic_write_bytes

from .models import build_model

FORMAT = "jpeg-restore-model/1"
STATE_RE = re.compile(r"step_(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A missing, corrupt or mismatched checkpoint; the message says which and why."""


def save(obj: dict, path: Path | str) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load(path: Path | str, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many kinds for truncated or foreign files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch checkpoint ({first[:200]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def model_checkpoint(model: nn.Module, arch: str, kwargs: dict, mode: str, config: dict, metrics: dict, step: int) -> dict:
    return {"format": FORMAT, "arch": arch, "kwargs": dict(kwargs), "mode": mode,
            "channels": 1 if mode == "gray" else 3, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "config": config, "metrics": metrics, "step": step}


def load_model(path: Path | str, map_location="cpu", expect_arch: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model of a model checkpoint (eval mode); returns (model, checkpoint without weights)."""
    ckpt = load(path, map_location)
    if ckpt.get("format") != FORMAT or "arch" not in ckpt:
        raise CheckpointError(f"{path} is not a jpeg-restore model checkpoint (no {FORMAT!r} format tag)")
    if expect_arch and ckpt["arch"] != expect_arch:
        raise CheckpointError(f"{path} holds a {ckpt['arch']} model, expected {expect_arch}")
    try:
        model = build_model(ckpt["arch"], channels=ckpt["channels"], **ckpt["kwargs"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild {ckpt['arch']}({ckpt['kwargs']}): {exc}") from None
    load_weights(model, ckpt["state_dict"], path)
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model.eval(), meta


def load_weights(model: nn.Module, state_dict: dict, path) -> None:
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise CheckpointError(f"{path}: weights do not fit {type(model).__name__} ({' '.join(lines[1:3])[:240]})") from None


def state_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:08d}.pt"


def latest_state(directory: Path) -> Path | None:
    found = sorted(p for p in Path(directory).glob("step_*.pt") if STATE_RE.search(p.name)) if Path(directory).is_dir() else []
    return found[-1] if found else None


def prune_states(directory: Path, keep: int = 2) -> None:
    found = sorted(p for p in directory.glob("step_*.pt") if STATE_RE.search(p.name))
    for p in found[:-keep]:
        p.unlink(missing_ok=True)
