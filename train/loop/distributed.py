"""One launch path: RANK / LOCAL_RANK / WORLD_SIZE from torchrun (or srun + torchrun) mean DDP
(NCCL on CUDA, gloo on CPU); without them a single process."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from data_pipeline.errors import ReportedElsewhere, UserError


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


def cleanup(finished: bool = False) -> None:
    """Leave the process group. After a finished run, a last barrier first: a gloo worker thread can
    still be freeing the tensors of the collective before, which needs the GIL; at interpreter exit
    that aborts the process ("terminate called without an active exception", about 1 run in 15
    here). The barrier's own work holds no Python tensors. (A rank that failed skips it: the others
    may never reach it.)"""
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if it is True on any rank (so all ranks stop at the same step)."""
    if not info.distributed:
        return flag
    t = torch.tensor([float(flag)], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


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
