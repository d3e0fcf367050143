"""One launch path: RANK / LOCAL_RANK / WORLD_SIZE from torchrun (or srun + torchrun) mean DDP
(NCCL on CUDA, gloo on CPU); without them a single process."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from data_pipeline.errors import ReportedElsewhere, UserError, first_line


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(timeout_s: int = 600, device: str = "auto") -> DistInfo:
    """Join the process group if launched by torchrun; pick this rank's device."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        if local_rank >= (gpus := torch.cuda.device_count()):
            raise UserError(f"rank {rank} wants GPU {local_rank} (LOCAL_RANK), this machine has {gpus}: start at most "
                            f"{gpus} per node (torchrun --nproc_per_node={gpus}) or train on the CPU (--device cpu)")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        # A rank that waits longer than the timeout on a collective raises instead of hanging.
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=dev if use_cuda else None)
    return DistInfo(rank, local_rank, world_size, dev)


def lost_other_ranks(exc: BaseException) -> str | None:
    """What a collective said when it failed because another rank's process had ended (gloo: the
    connection closed or reset; NCCL: a DistBackendError), without gloo's source location; else None."""
    text = first_line(exc)
    gone = isinstance(exc, dist.DistError) or any(s in text for s in ("Connection closed by peer", "Connection reset by peer"))
    return text.split("] ", 1)[-1].split(". ")[0] if gone else None


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def max_over_ranks(values: list[float], info: DistInfo) -> list[float]:
    """Each value's largest over the ranks, on every rank."""
    if not info.distributed:
        return values
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if it is True on any rank (so all ranks stop at the same step)."""
    return bool(max_over_ranks([float(flag)], info)[0])


def gather_objects(obj, info: DistInfo) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def on_main_rank(fn, info: DistInfo):
    """fn() on rank 0 while the other ranks wait, as at a barrier. A UserError it raises is raised
    on every rank (on the others as ReportedElsewhere, so the job prints it once): no rank is left
    waiting for a process that has gone, to die with a broken-connection traceback instead."""
    result = error = None
    if info.is_main:
        try:
            result = fn()
        except UserError as exc:
            error = exc
    if info.distributed:
        message = [str(error) if error else None]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None and not info.is_main:
            raise ReportedElsewhere(f"rank 0: {message[0]}")
    if error:
        raise error
    return result


def on_every_rank(fn, info: DistInfo):
    """fn() on every rank; fn holds no collective. A UserError is printed once: by the lowest rank
    that raised it (every rank reads the same config and checkpoints, so they fail alike), while
    the ranks that did not raise it stop without a line (ReportedElsewhere) instead of waiting at
    the next collective for one that has gone."""
    result = error = None
    try:
        result = fn()
    except UserError as exc:
        error = exc
    if info.distributed:
        messages = gather_objects(str(error) if error else None, info)
        failed = [m for m in messages if m is not None]
        if failed and (error is None or messages.index(str(error)) != info.rank):
            raise ReportedElsewhere(f"{len(failed)} of {info.world_size} ranks: {failed[0]}")
    if error:
        raise error
    return result
