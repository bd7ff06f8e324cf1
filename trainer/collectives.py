"""Collectives used by the model-parallel head, written once.

Conventions (open_clip style): ``local_*`` tensors belong to this rank,
``global_*`` tensors span the global batch in rank order.

Gradient convention for gathered tensors: the loss is ONE scalar replicated on
every rank. Each rank's backward produces its *share* of d(loss)/d(global
tensor); :class:`_AllGatherWithGrad` sums the shares over ranks and hands each
rank the rows it owns. A computation that is replicated on every rank (the
same value, the same gradient everywhere) must therefore contribute 1/R of its
gradient per rank: :func:`scale_grad` does that.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

ProcessGroup = Optional["dist.ProcessGroup"]


def world_info(group: ProcessGroup = None) -> Tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def class_range(num_classes: int, rank: int, world_size: int) -> Tuple[int, int]:
    """Contiguous shard ``[start, stop)`` of rank ``rank`` (docs/design.md §2).

    Sizes differ by at most one; the first ``num_classes % world_size`` ranks get
    one extra class (insightface's split, so shards map one to one).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def all_gather_object_ints(values: Sequence[int], group: ProcessGroup = None) -> torch.Tensor:
    """Gather a few int64 values per rank: returns ``[world_size, len(values)]`` (CPU).

    Used for batch sizes and error flags before any data collective, so that
    every rank takes the same decision and no rank is left hanging.
    """
    rank, world = world_info(group)
    local = torch.tensor(list(values), dtype=torch.int64)
    if world == 1:
        return local.unsqueeze(0)
    device = _collective_device(group)
    local = local.to(device)
    out = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(out, local, group=group)
    return torch.stack(out).cpu()


def _collective_device(group: ProcessGroup = None) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_padded(local: torch.Tensor, sizes: List[int], group: ProcessGroup) -> torch.Tensor:
    """all_gather rows of possibly different counts (pad to the max, then cut)."""
    world = len(sizes)
    max_rows = max(sizes)
    if local.shape[0] < max_rows:
        pad = local.new_zeros((max_rows - local.shape[0],) + tuple(local.shape[1:]))
        padded = torch.cat([local, pad])
    else:
        padded = local.contiguous()
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded, group=group)
    return torch.cat([o[:n] for o, n in zip(out, sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: List[int], group: ProcessGroup) -> torch.Tensor:
        rank, _ = world_info(group)
        ctx.group, ctx.start = group, sum(sizes[:rank])
        ctx.stop = ctx.start + sizes[rank]
        return _gather_padded(local, sizes, group)

    @staticmethod
    def backward(ctx, grad_global: torch.Tensor):
        # Sum every rank's share of the gradient, keep the rows this rank owns.
        grad_global = grad_global.contiguous()
        dist.all_reduce(grad_global, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad_global[ctx.start : ctx.stop], None, None


def all_gather_rows(
    local: torch.Tensor, sizes: List[int], group: ProcessGroup = None
) -> torch.Tensor:
    """Concatenate every rank's rows in rank order; gradient flows back to the owner.

    ``sizes[r]`` is the row count of rank r (ranks may differ, e.g. a last batch).
    Tensors without ``requires_grad`` are gathered without building a graph.
    """
    _, world = world_info(group)
    if world == 1:
        return local
    if local.requires_grad:
        return _AllGatherWithGrad.apply(local, list(sizes), group)
    return _gather_padded(local, list(sizes), group)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in the forward pass, multiplies the gradient by ``factor``."""
    if factor == 1.0 or not x.requires_grad:
        return x
    return _ScaleGrad.apply(x, factor)
