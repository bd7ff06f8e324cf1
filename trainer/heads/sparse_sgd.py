"""SGD for the class-centre shard that touches only the centres used in a step.

Semantics (the Partial FC paper's): with ``sample_rate < 1`` the head returns a
sparse gradient holding the rows of the centres sampled this step. ``step()``
updates exactly those rows — their momentum buffer, weight decay and weight —
and leaves every other centre AND its momentum untouched (no decay, no momentum
carry-over for centres that were not sampled: never read, never written).
Per-step cost is proportional to the sampled centres, not to the shard, and no
shape depends on the data (no coalesce, no host sync). With a dense gradient
(``sample_rate == 1``) it is exactly ``torch.optim.SGD`` (dampening 0):

    buf = momentum * buf + (grad + weight_decay * w);   w -= lr * buf

Half-width state (``loss.state_dtype: bf16``): when the parameter is bfloat16,
its momentum buffer is bfloat16 too (2 + 2 bytes per element instead of 4 + 4).
Each touched row is read, widened to float32, updated with the formula above
in float32, and written back with **stochastic rounding**: a float32 value
``v`` between the neighbouring bfloat16 values ``lo < hi`` becomes ``hi`` with
probability ``(v - lo) / (hi - lo)``, so ``E[round(v)] = v`` exactly (added
16 uniform random bits below the bfloat16 mantissa, then truncated). An update
``lr * buf`` far below one ulp of ``w`` (an ulp of bfloat16 is 2^-8 relative)
is then kept on average instead of lost, which round-to-nearest would do every
time. Why not Kahan-style compensation: it needs a third per-element buffer
(the lost low bits), i.e. back to 6 bytes per element, while stochastic
rounding needs nothing stored; its noise is zero-mean and much smaller than the
SGD noise of the sampled gradient.

Memory: the update runs in chunks of touched rows (``chunk_elements`` values
at a time), so its temporaries are bounded whatever the shard or sample size:
the step's extra memory is the sparse gradient itself plus one int64 per class
(the first-occurrence map below) plus a few chunks.

Repeated rows (several backward passes concatenate their sparse gradients):
``first[row]`` = the first entry holding ``row`` (``scatter_reduce`` amin, a
fixed-size map, no coalesce); the later entries' values are added into the
first entry's and zeroed, in place (the gradient stays the same sum). Each
chunk then updates its first entries; a repeated entry in the same chunk
recomputes exactly its first entry's update (same reads, same total, same
random bits), and one whose first entry lies in an earlier chunk writes back
what it reads (the row is already updated): every row is updated once.

Skipping on the device (GradScaler's protocol for fused optimizers): when the
attribute ``found_inf`` holds a tensor (set by the engine before ``step()``),
a nonzero value leaves weights and momentum exactly as they were, with no host
sync; ``None`` (the default) steps unconditionally.

It is a ``torch.optim.Optimizer``, so torch's LR schedulers drive it. The state
is one momentum buffer the size of the shard, allocated up front (its memory is
known from the start); ``state_dict()`` holds it as a row-aligned tensor, and
``load_state_dict`` converts a buffer of the other width (a checkpoint of the
other ``state_dtype``) to this parameter's dtype.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Union, overload

import torch
from torch import nn

#: ``loss.state_dtype`` -> storage dtype of the centres and their momentum
STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_LOW = (torch.bfloat16,)  # stored in 16 bits, updated in float32 with stochastic rounding


def stochastic_round_bf16(x: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """bfloat16 of float32 ``x``, rounded up with probability (x - lo) / ulp: unbiased.

    ``noise``: int32 uniform in [0, 2^16) of x's shape (drawn from torch's default
    generator when None). Adding it to the 16 bits that bfloat16 drops and
    truncating carries into the kept bits with exactly that probability; NaN
    stays NaN, and a value above the largest bfloat16 may round to inf.
    """
    x = x.to(torch.float32).contiguous()
    if noise is None:
        noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device)
    bits = x.view(torch.int32).add(noise).bitwise_and_(-65536)  # 0xFFFF0000
    return bits.view(torch.float32).to(torch.bfloat16)


class PartialFCSGD(torch.optim.Optimizer):
    def __init__(
        self,
        params: Union[nn.Module, Iterable[torch.Tensor]],
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        chunk_elements: Optional[int] = None,
    ) -> None:
        if isinstance(params, nn.Module):
            params = params.parameters()
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.chunk_elements = chunk_elements  # values per update chunk; None: 2^20 (CPU) / 2^24 (CUDA)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype == torch.float16:
                    raise TypeError("PartialFCSGD: float16 centres are not supported; use bfloat16 "
                                    "(loss.state_dtype: bf16) or float32")
                if group["momentum"] > 0:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    _step_supports_amp_scaling = True  # reads self.found_inf (grads already unscaled by the engine)

    def _chunk_rows(self, p: torch.Tensor) -> int:
        elements = self.chunk_elements or (1 << 24 if p.is_cuda else 1 << 20)
        return max(1, elements // max(1, p[0].numel() if p.dim() and p.shape[0] else 1))

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = closure() if closure is not None else None
        found = getattr(self, "found_inf", None)
        keep = None if found is None else (found.reshape(()) == 0)  # device bool: True = step
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].get("momentum_buffer")
                if p.grad.is_sparse:
                    self._sparse_update(p, p.grad, buf, lr, momentum, wd, keep, self._chunk_rows(p))
                elif keep is None and p.dtype not in _LOW:
                    self._dense_update(p, p.grad, buf, lr, momentum, wd)
                else:
                    for a in range(0, p.shape[0], self._chunk_rows(p)):
                        rows = slice(a, a + self._chunk_rows(p))
                        _update_rows(p, rows, p.grad[rows], buf, lr, momentum, wd, keep)
        return loss

    @staticmethod
    def _dense_update(p: torch.Tensor, grad: torch.Tensor, buf: Optional[torch.Tensor], lr: float, momentum: float,
                      wd: float) -> None:
        """float32/float64, no skip flag: in place, no temporary the size of the shard."""
        if buf is None:
            p.add_(grad, alpha=-lr)
            if wd:
                p.mul_(1 - lr * wd)
            return
        buf.mul_(momentum).add_(grad)
        if wd:
            buf.add_(p, alpha=wd)
        p.add_(buf, alpha=-lr)

    @staticmethod
    def _sparse_update(p: torch.Tensor, grad: torch.Tensor, buf: Optional[torch.Tensor], lr: float, momentum: float,
                       wd: float, keep: Optional[torch.Tensor], chunk_rows: int) -> None:
        rows, values = grad._indices()[0], grad._values()
        if not values.is_contiguous():  # e.g. expanded: rewritten below, so a copy of its own
            values = values.contiguous()
        m = rows.numel()
        if m == 0:
            return
        pos = torch.arange(m, device=rows.device)
        first = torch.full((p.shape[0],), m, dtype=torch.int64, device=rows.device)
        first = first.scatter_reduce_(0, rows, pos, "amin").index_select(0, rows)  # [m]
        later = first != pos  # a repeated entry (its row appeared before)
        # Totals into the first entries, repeated entries zeroed: in place, chunk by chunk.
        for a in range(0, m, chunk_rows):
            b = min(m, a + chunk_rows)
            mask = later[a:b].unsqueeze(1)
            values.index_add_(0, first[a:b], values[a:b] * mask)
            values[a:b].masked_fill_(mask, 0)
        for a in range(0, m, chunk_rows):
            b = min(m, a + chunk_rows)
            f, rep = first[a:b], later[a:b]
            # a repeat of a first entry in this chunk computes that entry's update (identical
            # write); a repeat of an earlier chunk's entry writes back what it reads (no-op)
            src = torch.where(rep & (f >= a), f, pos[a:b])
            noop = rep & (f < a)
            _update_rows(p, rows[a:b], values.index_select(0, src), buf, lr, momentum, wd,
                         keep, noop=noop, same_as=src - a)


def _update_rows(p: torch.Tensor, rows: Union[slice, torch.Tensor], grad: torch.Tensor, buf: Optional[torch.Tensor],
                 lr: float, momentum: float, wd: float, keep: Optional[torch.Tensor] = None,
                 noop: Optional[torch.Tensor] = None, same_as: Optional[torch.Tensor] = None) -> None:
    """SGD on ``p[rows]`` (a slice or an index tensor), math in float32 (or float64).

    ``keep`` (0-dim device bool): False leaves the rows as they were (torch.where: a
    NaN never leaks in). ``noop`` [k] bool: entries that write back what they read.
    ``same_as`` [k]: entry i uses the rounding noise of entry ``same_as[i]`` (equal
    rows compute equal bits). All reads happen before the writes.
    """
    indexed = isinstance(rows, torch.Tensor)
    low = p.dtype in _LOW
    wide = torch.float32 if low else p.dtype
    w_stored = p.index_select(0, rows) if indexed else p[rows]
    w = w_stored.to(wide)
    d = grad.to(wide)
    d = d.add(w, alpha=wd) if wd else d.clone()
    old: Optional[torch.Tensor] = None
    if buf is not None:
        old = buf.index_select(0, rows) if indexed else buf[rows]
        d.add_(old.to(wide), alpha=momentum)
    new_buf = d  # the new momentum (when there is one)
    new = w - lr * d

    def store(value: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        if low:
            noise = torch.randint(0, 1 << 16, value.shape, dtype=torch.int32, device=value.device)
            if same_as is not None:
                noise = noise.index_select(0, same_as)
            value = stochastic_round_bf16(value, noise)
        skip = None if noop is None else noop.unsqueeze(1)
        if keep is not None:
            skip = ~keep if skip is None else (skip | ~keep)
        return value if skip is None else torch.where(skip, current, value)

    if buf is not None and old is not None:
        out = store(new_buf, old)
        if indexed:
            buf.index_copy_(0, rows, out)
        else:
            buf[rows] = out
    out = store(new, w_stored)
    if indexed:
        p.index_copy_(0, rows, out)
    else:
        p[rows] = out
