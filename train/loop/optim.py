"""Losses, optimizers and learning-rate schedules (torch's), by the names the config uses."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def charbonnier(out: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    return torch.sqrt((out - target) ** 2 + eps**2).mean()


LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss, "charbonnier": charbonnier}
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "step", "plateau", "constant")


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
