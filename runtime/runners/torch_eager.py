"""PyTorch eager: the reference. fp32, or bf16 / fp16 autocast with channels_last. Without a
layout asked for, the device's faster one (channels_last on CPUs: `inference_channels_last`)."""
from __future__ import annotations

import torch

from ..checkpoint import load_model
from ..device import autocast_for, inference_channels_last, native_bf16
from ..models import fold_batch_norm
from . import Runner, register_runner


@register_runner("torch")
class TorchRunner(Runner):
    order = 0

    def __init__(self, model: torch.nn.Module, device: str = "cpu", precision: str = "fp32", channels_last: bool | None = None):
        self.device = torch.device(device)
        channels_last = inference_channels_last(self.device) if channels_last is None else channels_last
        layout = torch.channels_last if channels_last else torch.contiguous_format
        self.model = (fold_batch_norm(model) if precision == "fp32" else model.eval()).to(self.device, memory_format=layout)
        self.precision, self.channels_last = precision, channels_last

    @classmethod
    def open(cls, path, device="cpu", **options):
        return cls(load_model(path)[0], device, **options)

    @classmethod
    def variants(cls, device):
        bf16 = {"precision": "bf16", "channels_last": True} if native_bf16(torch.device(device)) else \
            f"bf16 is emulated on this {device} (no native bf16 kernels): fp32 is its fast path"
        out = [("torch fp32", {"channels_last": False}), ("torch bf16 NHWC", bf16)]  # NCHW fp32: the reference
        if inference_channels_last(torch.device(device)):
            out.insert(1, ("torch fp32 NHWC", {"channels_last": True}))
        if device.startswith("cuda"):
            out.append(("torch fp16 NHWC", {"precision": "fp16", "channels_last": True}))
        return out

    @torch.inference_mode()
    def __call__(self, x):
        x = x.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_for(self.precision, self.device):
            return self.model(x).float()

    def describe(self):
        return {**super().describe(), "precision": self.precision, "channels_last": self.channels_last}
