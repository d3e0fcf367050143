"""Fixed random tensors already on the device: measures compute, not data (throughput benchmarks)."""
from __future__ import annotations

from typing import Iterator

import torch

from . import Backend, register_backend


@register_backend("synthetic", order=90)
class SyntheticSource(Backend):
    needs_files, auto = False, False

    def __init__(self, pairs, cfg, rank: int, world_size: int, device: torch.device):
        g = torch.Generator().manual_seed(cfg.seed)
        shape = (cfg.batch_size, cfg.channels, cfg.patch_size, cfg.patch_size)
        target = torch.rand(shape, generator=g)
        noisy = (target + 0.05 * torch.randn(shape, generator=g)).clamp_(0, 1)
        if cfg.quality_plane:
            noisy = torch.cat([noisy, torch.full((shape[0], 1, *shape[2:]), 20 / 255)], dim=1)
        self.batch = (noisy.to(device), target.to(device))

    def batches(self, epoch: int, start: int = 0) -> Iterator:
        while True:
            yield self.batch
