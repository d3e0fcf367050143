"""Training for a time budget instead of a step count (`train.time_budget_s`): the step count is
refitted from the measured step rate as the run goes, so the learning-rate schedule ends when the
time does. This is how architectures are compared at equal GPU- or CPU-minutes of training.

The time counted is the time in training steps (data waits and the compile included; validations
and checkpoints not, so an architecture that is slow to validate is not charged for it), or with
`train.time_budget_wall` the clock's (a GPU call's hard window). The first fit waits for a second
log window of the session: the first one holds the compile.
"""
from __future__ import annotations

import torch


class TimeBudget:
    def __init__(self, seconds: float, max_steps: int):
        self.seconds, self.max_steps = seconds, max_steps
        self.anchor: tuple[int, float] | None = None  # (step, elapsed) where this session's rate is measured from

    def fit(self, step: int, elapsed: float) -> int | None:
        """The total step count that ends the run inside the budget (at least `step`, at most
        max_steps), or None while the rate is not measured yet. `elapsed`: seconds in training
        steps so far."""
        if self.anchor is None or step <= self.anchor[0]:  # decided by the step alone: the same on every rank
            self.anchor = self.anchor or (step, elapsed)
            return None
        remaining = self.seconds - elapsed
        if remaining <= 0:
            return step
        rate = (step - self.anchor[0]) / max(elapsed - self.anchor[1], 1e-9)
        return min(self.max_steps, step + int(remaining * rate))


def set_total_steps(scheduler, total: int, warmup_steps: int) -> None:
    """Moves the end of a cosine schedule (alone or after a warm-up) to `total` steps; the other
    schedules do not depend on the step count. torch's cosine is computed step to step from the
    current rate, so it still reaches min_lr exactly at the new end."""
    schedulers = getattr(scheduler, "_schedulers", [scheduler])
    for s in schedulers:
        if isinstance(s, torch.optim.lr_scheduler.CosineAnnealingLR):
            s.T_max = max(1, total - warmup_steps)
