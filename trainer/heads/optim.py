"""SGD for the class-centre shard that touches only the centres used in a step.

Semantics (the Partial FC paper's): with ``sample_rate < 1`` the head returns a
sparse gradient holding the rows of the centres sampled this step. ``step()``
updates exactly those rows — their momentum buffer, weight decay and weight —
and leaves every other centre AND its momentum untouched (no decay, no momentum
carry-over for centres that were not sampled). Per-step cost is proportional to
the sampled centres, not to the shard, and no shape depends on the data (no
coalesce, no host sync; temporaries: a few copies of the gradient's values). With a dense gradient
(``sample_rate == 1``) it is exactly ``torch.optim.SGD`` (dampening 0):

    buf = momentum * buf + (grad + weight_decay * w);   w -= lr * buf

Skipping on the device (GradScaler's protocol for fused optimizers): when the
attribute ``found_inf`` holds a tensor (set by the engine before ``step()``),
a nonzero value leaves weights and momentum exactly as they were, with no host
sync; ``None`` (the default) steps unconditionally.

It is a ``torch.optim.Optimizer``, so torch's LR schedulers drive it. The state
is one momentum buffer the size of the shard, allocated up front (its memory is
known from the start); ``state_dict()`` holds it as a row-aligned tensor.
"""
from __future__ import annotations

from typing import Iterable, Union

import torch
from torch import nn



class PartialFCSGD(torch.optim.Optimizer):
    def __init__(
        self,
        params: Union[nn.Module, Iterable[torch.Tensor]],
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
    ) -> None:
        if isinstance(params, nn.Module):
            params = params.parameters()
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        for group in self.param_groups:
            for p in group["params"]:
                if group["momentum"] > 0:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    _step_supports_amp_scaling = True  # reads self.found_inf (grads already unscaled by the engine)

    @torch.no_grad()
    def step(self, closure=None):
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
                    rows, values = _unique_rows(p.grad)
                    self._sparse_update(p, rows, values, buf, lr, momentum, wd, keep)
                else:
                    self._dense_update(p, p.grad, buf, lr, momentum, wd, keep)
        return loss

    @staticmethod
    def _dense_update(p, grad, buf, lr, momentum, wd, keep=None) -> None:
        if keep is not None:  # device-side skip (torch.where: a NaN gradient never leaks in)
            if buf is None:
                p.copy_(torch.where(keep, p - lr * (grad + wd * p), p))
                return
            buf.copy_(torch.where(keep, momentum * buf + grad + wd * p, buf))
            p.copy_(torch.where(keep, p - lr * buf, p))
            return
        if buf is None:
            p.add_(grad, alpha=-lr)
            if wd:
                p.mul_(1 - lr * wd)
            return
        # In place, no temporary the size of the shard.
        buf.mul_(momentum).add_(grad)
        if wd:
            buf.add_(p, alpha=wd)
        p.add_(buf, alpha=-lr)

    @staticmethod
    def _sparse_update(p, rows, values, buf, lr, momentum, wd, keep=None) -> None:
        # Every entry of a row holds the row's total gradient, so repeated rows compute and
        # write identical values; all reads happen before the writes. ``keep`` (device
        # bool): False leaves the rows as they were (torch.where: a NaN never leaks in).
        w = p.index_select(0, rows)
        d = values.add(w, alpha=wd) if wd else values.clone()
        if buf is not None:
            old = buf.index_select(0, rows)
            d.add_(old, alpha=momentum)
            buf.index_copy_(0, rows, d if keep is None else torch.where(keep, d, old))
        new = w - lr * d
        p.index_copy_(0, rows, new if keep is None else torch.where(keep, new, w))


def _unique_rows(grad: torch.Tensor):
    """``(rows, values)`` of a sparse row gradient; a repeated row's entries all hold its sum.

    The head emits sorted unique rows; several backward passes may concatenate
    them. No coalesce (its output size depends on the data, a host sync on a
    GPU): the entries are sorted by row, runs of equal rows are summed with a
    fixed-size ``index_add_`` and every entry of a run gets the run's total. For
    unique rows this is the identity (``0 + g == g``).
    """
    rows, values = grad._indices()[0], grad._values()
    m = rows.numel()
    if m < 2:
        return rows, values
    rows, order = torch.sort(rows, stable=True)
    values = values.index_select(0, order)
    starts = torch.ones(m, dtype=torch.int64, device=rows.device)
    starts[1:] = rows[1:] != rows[:-1]
    run = starts.cumsum(0) - 1
    totals = torch.zeros_like(values).index_add_(0, run, values)
    return rows, totals.index_select(0, run)
