"""What worker pools need from the system: the CPUs this process may run on (what Slurm's
--cpus-per-task, taskset or a container's cpuset allow, not all of the machine's: os.cpu_count()),
by which pools and ONNX Runtime's threads are sized as torch sizes its own (two ONNX Runtime
threads on one allowed core ran the U-Net 24% slower), and workers that die with their parent."""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no affinity outside Linux
        return os.cpu_count() or 1


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """For a worker process: be killed when `parent_pid` (its parent) dies, however it dies (OOM
    killer, SIGKILL), instead of waiting forever for work that will not come (a pool's workers
    hold both ends of their queue, so they see no end of file). Linux only; elsewhere nothing."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # it died before
        os._exit(1)


def spawned_pool(workers: int, initializer, initargs: tuple = ()) -> ProcessPoolExecutor:
    """A pool of fresh processes (`initializer` calls die_with_parent). Spawned, not forked: a fork
    copies the parent's objects, and a worker whose garbage collector met a copied DALI pipeline
    waited for ever in its destructor (a preparation after a DALI loader); CUDA and other threads'
    locks do not survive a fork either."""
    return ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), initializer=initializer, initargs=initargs)
