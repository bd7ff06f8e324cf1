"""Dense single-process reference of the loss, written from docs/design.md §1 literally.

Float64 autograd; no chunking, no sharding, a full sort for the quartiles and
the kept similarities appended as extra logit columns shared by every row (as
the authors' code does). Independent of trainer.heads on purpose.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


def margin_fn(kind: str, c: torch.Tensor, params: dict) -> torch.Tensor:
    theta = torch.acos(c)
    if kind == "arcface":
        return torch.cos(theta + params["m"])
    if kind == "cosface":
        return c - params["m"]
    if kind == "combined":
        return torch.cos(params["m1"] * theta + params["m2"]) - params["m3"]
    raise ValueError(kind)


def kept_negatives(x_hat: torch.Tensor, labels: torch.Tensor, wisk: float) -> torch.Tensor:
    """Kept similarities t in K (with gradient), from the definition."""
    n_rows = x_hat.shape[0]
    values = []
    for i in range(n_rows):
        for j in range(i + 1, n_rows):
            if labels[i] != labels[j]:
                values.append(x_hat[i] @ x_hat[j])
    if not values:
        return x_hat.new_zeros(0)
    t = torch.stack(values)
    srt = torch.sort(t.detach()).values
    n = t.numel()
    q1, q3 = srt[math.floor(0.25 * n)], srt[math.floor(0.75 * n)]
    iqr = q3 - q1
    keep = (t.detach() >= q1 - wisk * iqr) & (t.detach() <= q3 + wisk * iqr)
    return t[keep]


def pair_logits(x_hat: torch.Tensor, labels: torch.Tensor, s: float, wisk: Optional[float],
                groups: Optional[Sequence[int]] = None) -> list:
    """Per row, the extra logit columns s*t of UNPG's kept pairs (empty without UNPG).

    groups: for "local" negatives, the row counts of each rank's batch; a row then
    gets the kept pairs of its own group only.
    """
    n = x_hat.shape[0]
    if wisk is None:
        return [x_hat.new_zeros(0)] * n
    if groups is None:
        return [s * kept_negatives(x_hat, labels, wisk)] * n
    extras, start = [], 0
    for size in groups:
        k = kept_negatives(x_hat[start : start + size], labels[start : start + size], wisk)
        extras += [s * k] * size
        start += size
    return extras


def reference_loss(
    x: torch.Tensor,
    labels: torch.Tensor,
    w: torch.Tensor,
    kind: str,
    params: dict,
    s: float,
    wisk: Optional[float] = None,
    groups: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Mean over rows of -z_{i,y_i} + log(sum_c exp z_ic + sum_{t in K} exp(s t)).

    groups: for UNPG "local" negatives, the row counts of each rank's batch; row i
    then uses the kept pairs of its own group only.
    """
    x_hat = x / x.norm(dim=1, keepdim=True)
    w_hat = w / w.norm(dim=1, keepdim=True)
    cos = (x_hat @ w_hat.t()).clamp(-1, 1)
    n = x.shape[0]
    onehot = torch.zeros_like(cos, dtype=torch.bool)
    onehot[torch.arange(n), labels] = True
    target = s * margin_fn(kind, cos[onehot], params)
    z = torch.where(onehot, torch.zeros_like(cos), s * cos)
    z = z.masked_scatter(onehot, target)
    losses = []
    extras = pair_logits(x_hat, labels, s, wisk, groups)
    for i in range(n):
        row = torch.cat([z[i], extras[i]])
        losses.append(-target[i] + torch.logsumexp(row, dim=0))
    return torch.stack(losses).mean()


MARGINS = {
    "arcface": dict(m=0.5),
    "cosface": dict(m=0.35),
    "combined": dict(m1=0.9, m2=0.4, m3=0.15),
}


def make_margin(kind: str, s: float):
    from trainer.heads import ArcFace, CombinedMargin, CosFace

    cls = {"arcface": ArcFace, "cosface": CosFace, "combined": CombinedMargin}[kind]
    return cls(s=s, **MARGINS[kind])


def rank_step(head, x: torch.Tensor, labels: torch.Tensor, w: torch.Tensor, sizes: Sequence[int], rank: int):
    """One forward + backward of ``head`` on this rank's part of a global batch: the rank's
    rows of ``x``/``labels`` (``sizes`` per rank, in rank order) against its shard of the full
    weight ``w``. Returns (loss, local rows with their ``.grad``)."""
    lo = sum(sizes[:rank])
    start, stop = head.class_range
    with torch.no_grad():
        head.weight.copy_(w[start:stop])
    head.weight.grad = None
    local_x = x[lo:lo + sizes[rank]].clone().requires_grad_(True)
    loss = head(local_x, labels[lo:lo + sizes[rank]])
    loss.backward()
    return loss, local_x
