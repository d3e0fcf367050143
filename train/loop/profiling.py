"""A torch.profiler trace of a few training steps (train.profile_steps): where a step's time goes,
the loader's wait, the kernels and DDP's all-reduce among them. Each rank writes
<out>/profile/rank<R>_steps_<A>-<B>.json (open it in ui.perfetto.dev or chrome://tracing) and a
table of the ops that took the most time beside it (.txt). The first two steps of a session
(the compile, the allocator's warm-up) are passed over."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity

from data_pipeline.images import atomic_write_bytes

log = logging.getLogger("train.loop.trainer")
SKIPPED, WARMUP = 1, 1  # steps of a session before the recorded ones: not traced, traced and dropped


class StepProfiler:
    def __init__(self, steps: int, out: Path, rank: int, device: torch.device, current_step: Callable[[], int]):
        """`current_step()`: the training step that has just ended (the trace's last)."""
        self.folder, self.rank, self.device, self.current_step = Path(out) / "profile", rank, device, current_step
        self.profiler = None
        if steps > 0:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            next_step = current_step() + 1
            schedule = torch.profiler.schedule(skip_first=next_step, wait=SKIPPED, warmup=WARMUP, active=steps, repeat=1)
            self.profiler = torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=self._write)
            self.profiler.step_num = next_step  # its steps (ProfilerStep#N in the trace) numbered as the run's
            self.first = next_step + SKIPPED + WARMUP
            self.profiler.start()

    def step(self) -> None:
        """After each training step."""
        if self.profiler is not None:
            self.profiler.step()

    def close(self) -> None:
        """Ends the trace; a session that stopped inside the window writes the steps it recorded."""
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None

    def _write(self, profiler: torch.profiler.profile) -> None:
        base = name = f"rank{self.rank}_steps_{self.first}-{self.current_step()}"
        n = 1
        while (self.folder / f"{name}.json").exists():  # a resumed run that steps through these again keeps the earlier trace
            n += 1
            name = f"{base}-{n}"
        self.folder.mkdir(parents=True, exist_ok=True)
        trace = self.folder / f"{name}.json"
        profiler.export_chrome_trace(str(trace))
        by = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        atomic_write_bytes(trace.with_suffix(".txt"), profiler.key_averages().table(sort_by=by, row_limit=30).encode())
        if self.rank == 0:
            log.info("profiled steps %d-%d: %s (ui.perfetto.dev), the ops that took longest in %s",
                     self.first, self.current_step(), trace, trace.with_suffix(".txt").name)
