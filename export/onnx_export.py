"""ONNX export of a model checkpoint (the command: export/to_onnx.py). Fully convolutional
models get dynamic batch, height and width; the autoencoder (dense bottleneck) exports at its
tile size with a dynamic batch, and runners tile whole images."""
from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import torch

from data_pipeline.images import atomic_write_bytes
from runtime.artifacts import check_replaceable, file_sha256, write_meta
from runtime.checkpoint import load_model
from runtime.inference import input_channels
from runtime.runners import make_runner

from .parity import parity


class FixedTile(torch.nn.Module):
    """The autoencoder's fixed-size forward, the graph that gets exported (ONNX, AOTInductor)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_tile(x)


def export_onnx(checkpoint: Path | str, out: Path | str, fp16: bool = False) -> dict:
    """Writes the ONNX file atomically; returns what runners need to know (tile size, channels)."""
    check_replaceable(out)
    model, meta = load_model(checkpoint)
    tile = getattr(model, "tile", 0)
    c = input_channels(meta)
    if tile:
        module, example, dims = FixedTile(model), torch.rand(2, c, tile, tile), {0: "batch"}
    else:
        module, example, dims = model, torch.rand(1, c, 67, 45), {0: "batch", 2: "height", 3: "width"}
    if fp16:
        module, example = module.half(), example.half()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), (example,), dynamo=True, input_names=["input"], output_names=["output"],
                                    dynamic_shapes={"x": dims}, verbose=False)
    import onnx

    proto = program.model_proto
    proto.doc_string = f"jpeg-restore {meta['arch']} {meta['kwargs']} mode={meta['mode']} tile={tile}"
    onnx.checker.check_model(proto, full_check=True)
    buf = io.BytesIO()
    onnx.save(proto, buf)
    atomic_write_bytes(out, buf.getvalue())
    info = {"arch": meta["arch"], "kwargs": meta["kwargs"], "channels": c, "mode": meta["mode"], "tile": tile,
            "overlap": getattr(model, "overlap", 16), "fp16": fp16, "checkpoint": str(checkpoint),
            "checkpoint_sha256": file_sha256(checkpoint)}
    write_meta(out, info)
    return {**info, "path": str(out)}


def check_parity(checkpoint: Path | str, onnx_path: Path | str, data_root: str | None = None, count: int = 3,
                 quality: int = 10) -> dict:
    """ONNX Runtime (CPU provider) against PyTorch on real images."""
    return parity(checkpoint, make_runner("onnxruntime", onnx_path), data_root, count, quality)
