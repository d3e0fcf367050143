"""A compiled deployable package: torch.export + AOTInductor (`aoti_compile_and_package`) to a
`.pt2` that loads and runs without the model's Python code (`torch._inductor.aoti_load_package`),
with dynamic batch, height and width (in multiples of the model's size multiple, which the runner
pads to; the autoencoder at its tile size). The command: export/to_aoti.py."""
from __future__ import annotations

import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

from runtime.artifacts import check_replaceable, file_sha256, write_meta
from runtime.checkpoint import load_model
from runtime.inference import input_channels

from .onnx_export import FixedTile

MAX_SIDE = 8192


def export_aoti(checkpoint: Path | str, out: Path | str, device: str = "cpu") -> dict:
    """Compiles the checkpoint's model for `device` into the package `out` (atomically) and its
    sidecar; returns the sidecar (compile seconds included)."""
    check_replaceable(out)
    model, meta = load_model(checkpoint, device)
    model = model.to(device)
    c, tile = input_channels(meta), getattr(model, "tile", 0)
    batch = torch.export.Dim("batch", min=1, max=256)
    if tile:
        module, example, dims = FixedTile(model), torch.rand(2, c, tile, tile, device=device), {0: batch}
        multiple = tile
    else:
        multiple = getattr(model, "size_multiple", 1)
        side = lambda name: multiple * torch.export.Dim(name, min=max(1, 16 // multiple), max=MAX_SIDE // multiple)  # noqa: E731
        module, example = model, torch.rand(2, c, 4 * multiple * 3, 4 * multiple * 5, device=device)
        dims = {0: batch, 2: side("h"), 3: side("w")}
    start = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        # torch's own deepcopy of the FX graph makes a pytree LeafSpec, whose deprecation warns (pytorch#167470)
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
        program = torch.export.export(module.eval(), (example,), dynamic_shapes={"x": dims})
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".pt2")
        os.close(fd)
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, out)
        finally:
            Path(tmp).unlink(missing_ok=True)
    info = {"arch": meta["arch"], "kwargs": meta["kwargs"], "channels": c, "mode": meta["mode"], "tile": tile,
            "overlap": getattr(model, "overlap", 16), "multiple": multiple, "device": torch.device(device).type,
            "compile_s": time.perf_counter() - start, "torch": torch.__version__, "checkpoint": str(checkpoint),
            "checkpoint_sha256": file_sha256(checkpoint)}
    write_meta(out, info)
    return {**info, "path": str(out)}
