"""Exported files (ONNX graphs, TensorRT engines, AOTInductor packages) carry a JSON sidecar
`<file>.json`: the checkpoint they came from (path and SHA-256), arch, channel mode, tile size,
precision. Runners read it (tile size); export uses it to tell a current file from a stale one."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from data_pipeline.errors import UserError
from data_pipeline.images import atomic_write_json


def meta_path(artifact: Path | str) -> Path:
    return Path(f"{artifact}.json")


def read_meta(artifact: Path | str) -> dict:
    try:
        return json.loads(meta_path(artifact).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def check_replaceable(artifact: Path | str) -> None:
    """An export may write `artifact` where nothing is, or over an earlier export (its sidecar is
    beside it); any other file at that path is the user's and stays."""
    path = Path(artifact)
    if path.exists() and not (path.is_file() and meta_path(path).is_file()):
        raise UserError(f"{path} exists and is not a file exported by this project (no {meta_path(path).name} "
                        "beside it): choose another --out or move it away")


def write_meta(artifact: Path | str, meta: dict) -> None:
    atomic_write_json(meta_path(artifact), meta)


def file_sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_current(artifact: Path | str, checkpoint: Path | str) -> bool:
    """The artifact exists and its sidecar names this checkpoint's exact content."""
    return Path(artifact).is_file() and read_meta(artifact).get("checkpoint_sha256") == file_sha256(checkpoint)
