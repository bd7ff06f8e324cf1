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

from typing import Any, Callable, List, Optional, Sequence, Tuple, cast

import torch
import torch.distributed as dist

ProcessGroup = Optional["dist.ProcessGroup"]


# torch.distributed's collectives are not fully annotated (their parameters are partly
# Unknown to a type checker): the two this module calls go through one typed door each.
def _dist_all_gather(out: List[torch.Tensor], x: torch.Tensor, group: ProcessGroup) -> None:
    dist.all_gather(out, x, group=group)  # pyright: ignore[reportUnknownMemberType]


def _dist_all_reduce(x: torch.Tensor, op: Any, group: ProcessGroup) -> None:
    dist.all_reduce(x, op=op, group=group)  # pyright: ignore[reportUnknownMemberType]


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
    _, world = world_info(group)
    local = torch.tensor(list(values), dtype=torch.int64)
    if world == 1:
        return local.unsqueeze(0)
    device = _collective_device(group)
    local = local.to(device)
    out = [torch.empty_like(local) for _ in range(world)]
    _dist_all_gather(out, local, group)
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
    _dist_all_gather(out, padded, group)
    return torch.cat([o[:n] for o, n in zip(out, sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, sizes: List[int], group: ProcessGroup) -> torch.Tensor:
        rank, _ = world_info(group)
        ctx.group, ctx.start = group, sum(sizes[:rank])
        ctx.stop = ctx.start + sizes[rank]
        return _gather_padded(local, sizes, group)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> Tuple[torch.Tensor, None, None]:
        # Sum every rank's share of the gradient, keep the rows this rank owns.
        grad_global = grad_outputs[0].contiguous()
        _dist_all_reduce(grad_global, dist.ReduceOp.SUM, ctx.group)
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
        apply = cast(Callable[..., torch.Tensor], _AllGatherWithGrad.apply)  # pyright: ignore[reportUnknownMemberType]
        return apply(local, list(sizes), group)
    return _gather_padded(local, list(sizes), group)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> Tuple[torch.Tensor, None]:
        return grad_outputs[0] * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in the forward pass, multiplies the gradient by ``factor``."""
    if factor == 1.0 or not x.requires_grad:
        return x
    apply = cast(Callable[..., torch.Tensor], _ScaleGrad.apply)  # pyright: ignore[reportUnknownMemberType]
    return apply(x, factor)


def all_reduce_(tensor: torch.Tensor, op: str = "sum", group: ProcessGroup = None) -> torch.Tensor:
    """In-place all-reduce (``op``: "sum" or "max") without gradient; a no-op in one process."""
    _, world = world_info(group)
    if world > 1:
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        _dist_all_reduce(tensor, reduce_op, group)
    return tensor


# --------------------------------------------------------------------------------------------
# Exact distributed order statistics (radix selection on the float bit patterns)
# --------------------------------------------------------------------------------------------
_RADIX_BITS = 16
_RADIX_BINS = 1 << _RADIX_BITS
_KEY_DTYPES = {torch.float32: (torch.int32, 32), torch.float64: (torch.int64, 64)}


def _sortable_keys(values: torch.Tensor) -> torch.Tensor:
    """Signed integers with the order of the floats (``-0.0`` merged into ``+0.0``).

    IEEE-754 bit patterns read as signed integers are ordered for non-negative
    floats and reversed for negative ones; flipping every bit but the sign of the
    negative ones makes the map monotone (and its own inverse). ``-0.0`` is first
    turned into ``+0.0`` (``x + 0.0``) so that equal floats get equal keys.
    """
    int_dtype, bits = _KEY_DTYPES[values.dtype]
    raw = (values + 0.0).view(int_dtype)
    return raw ^ ((raw >> (bits - 1)) & ((1 << (bits - 1)) - 1))


def _keys_to_floats(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    int_dtype, bits = _KEY_DTYPES[dtype]
    keys = keys.to(int_dtype)
    return (keys ^ ((keys >> (bits - 1)) & ((1 << (bits - 1)) - 1))).view(dtype)


def _histogram(index: torch.Tensor, size: int) -> torch.Tensor:
    """int64 counts of each value of ``index`` in ``[0, size)``, without a host sync."""
    if index.device.type == "cpu":
        return torch.bincount(index, minlength=size)  # fastest on CPU; syncs on CUDA
    counts = torch.zeros(size, dtype=torch.int64, device=index.device)
    return counts.index_add_(0, index, torch.ones(1, dtype=torch.int64, device=index.device).expand(index.numel()))


def order_statistics(
    local: torch.Tensor,
    positions: Callable[[torch.Tensor], Any],
    group: ProcessGroup = None,
    chunk_elements: int = 1 << 20,
    local_only: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact 0-based order statistics of the union of every rank's ``local`` values.

    ``local_only=True``: of this rank's values alone (no collective; e.g. values
    replicated on every rank).

    ``local``: float32 or float64, any shape and strides (a 2-D view is read in
    row chunks of about ``chunk_elements``); NaN entries are not values (they mark
    holes, e.g. pairs another rank owns). ``positions(n)`` maps the global count
    ``n`` (an int64 0-dim tensor) to an int64 tensor of ``m`` 0-based ranks in
    ``[0, n)``. Returns ``(values [m], n)``: ``values[k]`` is bit for bit the
    ``positions(n)[k]``-th smallest value, as ``torch.sort`` of the concatenation
    gives it (``+0.0`` for a zero). Out-of-range positions give unspecified
    values (no error: the caller knows ``n``).

    Radix selection, 16 bits per pass from the top (2 passes for float32, 4 for
    float64): each pass every rank counts its values per 16-bit digit among those
    whose higher digits equal the prefix chosen so far (one histogram per target
    position; the first pass has one shared histogram), one all-reduce SUM adds
    the counts, and a cumulative sum picks the digit holding each target's rank.
    The values are never moved, and nothing leaves the device (no host sync).
    """
    if local.dtype not in _KEY_DTYPES:
        raise TypeError(f"order_statistics: float32 or float64 values expected, got {local.dtype}")
    int_dtype, bits = _KEY_DTYPES[local.dtype]
    rows = local.flatten(1) if local.dim() >= 2 else local.reshape(-1, 1)
    chunk_rows = max(1, int(chunk_elements) // max(1, rows.shape[1]))
    device = local.device
    nb, half = _RADIX_BINS, _RADIX_BINS >> 1
    # set by pass 0 (the global count, the target ranks, the digits chosen so far)
    n = ranks = prefix = target_prefix = torch.zeros(0, dtype=torch.int64, device=device)
    for p in range(bits // _RADIX_BITS):
        shift = bits - _RADIX_BITS * (p + 1)
        m = 1 if p == 0 else ranks.numel()  # pass 0 has no prefix yet: one shared histogram
        counts = torch.zeros(m, nb + 1, dtype=torch.int64, device=device)
        if p > 0:
            target_prefix = prefix.to(int_dtype)
        for a in range(0, rows.shape[0], chunk_rows):
            values = rows[a : a + chunk_rows].reshape(-1)
            keys = _sortable_keys(values)
            valid = ~torch.isnan(values)
            if p == 0:
                digit = (keys >> shift) + half  # the top digit is signed: shift it to [0, nb)
                counts[0] += _histogram(torch.where(valid, digit, nb), nb + 1)
                continue
            high, digit = keys >> (shift + _RADIX_BITS), (keys >> shift) & (nb - 1)
            for j in range(m):
                hit = (high == target_prefix[j]) & valid
                counts[j] += _histogram(torch.where(hit, digit, nb), nb + 1)
        counts = counts[:, :nb].contiguous()
        if not local_only:
            counts = all_reduce_(counts, "sum", group)
        if p == 0:
            n = counts.sum()
            ranks = torch.as_tensor(positions(n), dtype=torch.int64, device=device).reshape(-1)
            counts = counts.expand(ranks.numel(), nb)
        cumulative = counts.cumsum(1)
        # First digit whose cumulative count exceeds the rank: the target lies in that bin.
        digit = torch.searchsorted(cumulative, ranks.unsqueeze(1), right=True).clamp_max(nb - 1)
        below = cumulative.gather(1, digit) - counts.gather(1, digit)
        ranks = ranks - below.squeeze(1)
        digit = digit.squeeze(1)
        prefix = digit - half if p == 0 else prefix * nb + digit
    return _keys_to_floats(prefix, local.dtype), n
