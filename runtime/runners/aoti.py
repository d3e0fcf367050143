"""An AOTInductor package (`.pt2`, export/aoti_export.py): compiled code that runs without the
model's Python source. Inputs are padded to the package's size multiple (and tiled for
fixed-size models); the compile time is in the sidecar and in describe()."""
from __future__ import annotations

from pathlib import Path

import torch

from ..artifacts import read_meta
from ..models.common import pad_to_multiple
from ..tiling import tiled_forward
from . import Runner, RunnerUnavailable, register_runner


@register_runner("aoti")
class AOTIRunner(Runner):
    artifact, order = "pt2", 4

    def __init__(self, package: Path | str, device: str = "cpu"):
        meta = read_meta(package)
        if not Path(package).is_file():
            raise RunnerUnavailable(f"no AOTInductor package at {package}")
        want = torch.device(device).type
        if meta.get("device", want) != want:
            raise RunnerUnavailable(f"{package} was compiled for {meta['device']}, not {want}")
        self.device = torch.device(device)
        self.package = torch._inductor.aoti_load_package(str(package))
        self.tile, self.overlap = meta.get("tile", 0), meta.get("overlap", 16)
        self.multiple, self.compile_s = meta.get("multiple", 1), meta.get("compile_s")

    @classmethod
    def open(cls, path, device="cpu", **options):
        return cls(path, device)

    @classmethod
    def variants(cls, device):
        return [("aoti fp32", {})]

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return self.package(x.to(self.device).contiguous()).float()

    @torch.inference_mode()
    def __call__(self, x):
        if self.tile:
            return self._run(x) if x.shape[-2:] == (self.tile, self.tile) else tiled_forward(self._run, x, self.tile, self.overlap)
        xp, (h, w) = pad_to_multiple(x, self.multiple)
        return self._run(xp)[..., :h, :w]

    def describe(self):
        return {**super().describe(), "precision": "fp32", "compile_s": self.compile_s}
