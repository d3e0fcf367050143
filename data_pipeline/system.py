"""The CPUs this process may run on: what Slurm's --cpus-per-task, taskset or a container's cpuset
allow, not all of the machine's (os.cpu_count()). Worker pools and ONNX Runtime's threads are sized
by it, as torch sizes its own: two ONNX Runtime threads on one allowed core ran the U-Net 24% slower."""
from __future__ import annotations

import os


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no affinity outside Linux
        return os.cpu_count() or 1
