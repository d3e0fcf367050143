"""What worker pools need from the system: the CPUs this process may run on (what Slurm's
--cpus-per-task, taskset or a container's cpuset allow, not all of the machine's: os.cpu_count()),
by which pools and ONNX Runtime's threads are sized as torch sizes its own (two ONNX Runtime
threads on one allowed core ran the U-Net 24% slower), workers that die with their parent, and
freed memory kept for reuse. No torch here: a pool's workers import this module."""
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


# A stop signal to the process group (Ctrl-C, timeout, scancel) is the parent's to handle (the trainer
# validates once more before it saves): workers that leave it to the parent ignore it.
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def start_worker(parent_pid: int, ignore_stop_signals: bool = False) -> None:
    """A metric pool's worker initializer: freed memory kept (scikit-image's SSIM page-faults its
    buffers afresh every image without: 3x slower), killed with its parent (nothing else would end
    it after an outright kill: OOM, timeout -k), and, for the trainer's, stop signals ignored; the
    parent holds them blocked while workers start, so they are unblocked once ignored."""
    keep_freed_memory()
    if ignore_stop_signals:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    die_with_parent(parent_pid)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt() parameters


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Keep freed buffers of up to `limit` bytes for reuse instead of giving them back to the OS.
    glibc returns every buffer above 32 MiB (a 512² activation of 32 channels is 34 MB), and the
    next one of that size page-faults afresh: a third of CPU inference went to the kernel. Freed
    memory then stays with the process (the peak RSS of a 12-megapixel restore did not move). False
    where the C library has no mallopt (not glibc); called first by the commands that run models."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # the mmap threshold first: a trim threshold alone would pin the mmap one at its 128 KiB default
    return bool(mallopt(M_MMAP_THRESHOLD, limit) and mallopt(M_TRIM_THRESHOLD, limit))
