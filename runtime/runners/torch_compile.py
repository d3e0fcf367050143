"""torch.compile (inductor); a compile failure becomes RunnerUnavailable with the reason."""
from __future__ import annotations

import torch

from . import RunnerUnavailable, register_runner
from .torch_eager import TorchRunner


@register_runner("torch-compile")
class CompiledRunner(TorchRunner):
    order = 1

    def __init__(self, model, device="cpu", precision="fp32", channels_last=False):
        super().__init__(model, device, precision, channels_last)
        self.model = torch.compile(self.model, dynamic=False)

    @classmethod
    def variants(cls, device):
        return [("torch.compile fp32", {})]

    def __call__(self, x):
        try:
            return super().__call__(x)
        except Exception as exc:  # noqa: BLE001 - inductor errors have many types
            raise RunnerUnavailable(f"torch.compile failed: {str(exc).strip().splitlines()[0][:160]}") from None
