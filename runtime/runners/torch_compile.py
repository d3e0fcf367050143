"""torch.compile (inductor); a compile failure becomes RunnerUnavailable with the reason.

`mode="reduce-overhead"` adds CUDA graphs on GPU: one graph replay per call instead of one launch
per kernel (what batch-1 latency on a GPU is made of). Each input shape compiles once, in the
latency table's first call, which is reported apart. restore runs images up to one tile (512 px)
eagerly and larger ones compiled, in 512-px tiles: one shape, where a folder of photos of many
sizes compiled once per size (torch gives up after 8, with a warning, and runs the rest eagerly)."""
from __future__ import annotations

import torch

from ..device import native_bf16
from ..tiling import TILE
from . import RunnerUnavailable, register_runner
from .torch_eager import TorchRunner


@register_runner("torch-compile")
class CompiledRunner(TorchRunner):
    order = 1

    def __init__(self, model, device="cpu", precision="fp32", channels_last=None, mode="default"):
        super().__init__(model, device, precision, channels_last)
        self.eager = TorchRunner(self.model, device, precision, channels_last)
        self.mode = mode
        self.model = torch.compile(self.model, dynamic=False, mode=None if mode == "default" else mode)

    @classmethod
    def variants(cls, device):
        out = [("torch.compile fp32", {"channels_last": False})]
        if native_bf16(torch.device(device)):
            out.append(("torch.compile bf16 NHWC", {"precision": "bf16", "channels_last": True}))
        if device.startswith("cuda"):  # half outputs are copied by .float(): no graph buffer escapes
            out += [("torch.compile fp16 NHWC CUDA graphs", {"precision": "fp16", "channels_last": True, "mode": "reduce-overhead"}),
                    ("torch.compile bf16 NHWC CUDA graphs", {"precision": "bf16", "channels_last": True, "mode": "reduce-overhead"})]
        return out

    def __call__(self, x):
        if self.mode != "default":
            torch.compiler.cudagraph_mark_step_begin()  # the previous call's outputs may be overwritten
        try:  # freezing on CPU, read as a call compiles: the weights become constants, which inductor prepacks for
            # oneDNN, fusing each convolution's ReLU into it (torch.compile's options= does not reach it)
            with torch._inductor.config.patch(freezing=self.device.type == "cpu"):
                return super().__call__(x)
        except Exception as exc:  # noqa: BLE001 - inductor errors have many types
            raise RunnerUnavailable(f"torch.compile failed: {str(exc).strip().splitlines()[0][:160]}") from None

    def restore(self, x, ensemble=False, tiles_per_call=1, progress=None):
        if max(x.shape[-2:]) <= TILE:  # one compile per image size would cost more than it saves
            return self.eager.restore(x, ensemble, tiles_per_call, progress)
        return super().restore(x, ensemble, tiles_per_call, progress)

    def describe(self):
        return {**super().describe(), "compile_mode": self.mode}
