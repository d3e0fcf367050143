"""Losses, optimizers and learning-rate schedules (torch's), by the names the config uses."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def charbonnier(out: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    return torch.sqrt((out - target) ** 2 + eps**2).mean()


LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss, "charbonnier": charbonnier}
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "step", "plateau", "constant")


def blocking_effect_factor(x: torch.Tensor, block: int = 8) -> torch.Tensor:
    """PSNR-B's penalty (runtime/metrics/psnrb.py) of an N x C x H x W batch in [0, 1], differentiable:
    the excess of the squared steps across the 8x8 block boundaries over those inside blocks, mean
    over images and channels (equal to the metric / 255^2 where the sides are whole blocks)."""
    h, w = x.shape[-2:]
    across, down = (x[..., 1:] - x[..., :-1]) ** 2, (x[..., 1:, :] - x[..., :-1, :]) ** 2
    bound = across[..., block - 1::block].sum((-2, -1)) + down[..., block - 1::block, :].sum((-2, -1))
    steps = across.sum((-2, -1)) + down.sum((-2, -1))  # slices, not masks: no wait for the device
    n_bound = (w - 1) // block * h + (h - 1) // block * w
    n_inner = (w - 1) * h + (h - 1) * w - n_bound
    bound, inner = bound / n_bound, (steps - bound) / n_inner
    return (math.log2(block) / math.log2(min(h, w)) * F.relu(bound - inner)).mean()


def build_loss(cfg):
    """train.loss, plus train.blocking_weight times the output's blocking effect factor."""
    base, weight = LOSSES[cfg.train.loss], cfg.train.blocking_weight
    if not weight:
        return base
    return lambda out, target: base(out, target) + weight * blocking_effect_factor(out)


def state_bytes_per_parameter(cfg) -> int:
    """What training keeps per parameter, in fp32: the weight, its gradient, the optimizer's moments
    and the weight average (activations and DDP's buckets come on top)."""
    moments = (1 if cfg.optim.momentum else 0) if cfg.optim.name == "sgd" else 2
    return 4 * (2 + moments + (1 if cfg.train.ema_decay else 0))


def build_optimizer(cfg, params) -> torch.optim.Optimizer:
    """Adam/AdamW are fused (one kernel for all parameters) on CUDA and CPUs."""
    o, params = cfg.optim, list(params)
    fused = {"fused": True} if params and params[0].device.type in ("cuda", "cpu") else {}
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay, **fused)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, **fused)
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    raise ValueError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {o.name!r}")


def build_scheduler(cfg, opt: torch.optim.Optimizer):
    """torch schedulers, stepped once per optimizer step ('plateau': once per validation)."""
    s, sched = cfg.schedule, torch.optim.lr_scheduler
    if s.name == "plateau":
        return sched.ReduceLROnPlateau(opt, mode="max", factor=s.gamma, patience=s.patience, min_lr=s.min_lr)
    if s.name == "cosine":
        main = sched.CosineAnnealingLR(opt, T_max=max(1, cfg.train.max_steps - s.warmup_steps), eta_min=s.min_lr)
    elif s.name == "step":
        main = sched.StepLR(opt, step_size=s.step_size, gamma=s.gamma)
    elif s.name == "constant":
        main = sched.ConstantLR(opt, factor=1.0, total_iters=0)
    else:
        raise ValueError(f"schedule.name must be one of {', '.join(SCHEDULES)}, got {s.name!r}")
    if s.warmup_steps <= 0:
        return main
    warmup = sched.LinearLR(opt, start_factor=1e-3, end_factor=1.0, total_iters=s.warmup_steps)
    return sched.SequentialLR(opt, [warmup, main], milestones=[s.warmup_steps])
