"""Process-group setup: torchrun env (RANK/WORLD_SIZE/LOCAL_RANK) or a single process.

NCCL when CUDA is available, gloo otherwise; the device comes from LOCAL_RANK.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group torchrun (or a test harness) set up; one process otherwise."""
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
        return DistInfo(dist.get_rank(), world, local_rank, device, initialized_here=True)
    return DistInfo(0, 1, 0, device)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_ok(ok: bool) -> bool:
    """True on every rank iff ``ok`` is True on every rank (one all-reduce MIN)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([1 if ok else 0], dtype=torch.int32)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())
    return ok


def gather_strings(text: str) -> list:
    """Every rank's ``text``, in rank order, on every rank (error paths only: pickles over the group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, text)
        return out
    return [text]
