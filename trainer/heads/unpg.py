"""UNPG's metric negatives: the box-and-whisker-filtered negative pairs (docs/design.md §1).

For embeddings ``x^`` (L2-normalised) with labels ``y``:

    P-  = {(i, j): i < j, y_i != y_j},   t_ij = <x^_i, x^_j>
    Q1  = t_(floor(0.25 n)), Q3 = t_(floor(0.75 n))   (0-based order statistics, n = |P-|)
    K   = {t in P-: Q1 - w IQR <= t <= Q3 + w IQR}
    V   = log sum_{t in K} exp(s t)

The loss uses ``V`` once per row as an extra denominator term:
``log(sum_c exp(z_ic) + exp(V))`` — a scalar, never an N x |K| matrix. The
bounds are selected order statistics (``torch.kthvalue``: selection, not a full
sort) computed without gradient; gradient flows through every kept ``t_ij``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

NEGATIVE_MODES = ("global", "local")
_HIST_SAMPLE = 4096  # negative similarities kept for monitoring histograms


@dataclass(frozen=True, kw_only=True)
class UNPG:
    """Configuration of the UNPG term.

    wisk: whisker length ``w`` of the box-and-whisker filter (paper: 1.0-1.5).
    negatives: "global" pairs over the all-gathered global batch (default) or
        "local": each row's pairs come from its own rank's batch only (what the
        authors' single-GPU code does; kept for ablations).
    """

    wisk: float = 1.5
    negatives: str = "global"

    def __post_init__(self) -> None:
        if self.negatives not in NEGATIVE_MODES:
            raise ValueError(f"UNPG.negatives must be one of {NEGATIVE_MODES}, got {self.negatives!r}")
        if not (self.wisk >= 0 and math.isfinite(self.wisk)):
            raise ValueError(f"UNPG.wisk must be a finite number >= 0, got {self.wisk!r}")


def _order_statistic(values: torch.Tensor, index: int) -> torch.Tensor:
    """0-based ``index``-th smallest value (``kthvalue`` is 1-based)."""
    return torch.kthvalue(values, index + 1).values


def metric_negatives_lse(
    x_hat: torch.Tensor, labels: torch.Tensor, s: float, wisk: float
) -> Tuple[Optional[torch.Tensor], Dict[str, object]]:
    """``V = log sum_{t in K} exp(s t)`` and monitoring statistics.

    Returns ``(None, stats)`` when there is no negative pair (every label equal):
    the UNPG term is then absent (docs/design.md §1).
    """
    n_rows = x_hat.shape[0]
    sims = x_hat @ x_hat.t()  # [N, N]
    upper = torch.ones(n_rows, n_rows, dtype=torch.bool, device=x_hat.device).triu_(1)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    neg_mask = upper & ~same
    t = sims[neg_mask]  # the n values of P-, with gradient
    n = t.numel()
    stats: Dict[str, object] = {"neg_pairs": float(n)}
    with torch.no_grad():
        pos = sims[upper & same]
        stats["mean_pos_sim"] = float(pos.mean()) if pos.numel() else float("nan")
    if n == 0:
        stats.update(kept=0.0, lower=float("nan"), upper=float("nan"), mean_neg_sim=float("nan"),
                     neg_sims=t.detach()[:0].float().cpu())
        return None, stats
    with torch.no_grad():
        t_detached = t.detach()
        q1 = _order_statistic(t_detached, math.floor(0.25 * n))
        q3 = _order_statistic(t_detached, math.floor(0.75 * n))
        iqr = q3 - q1
        lower, upper_bound = q1 - wisk * iqr, q3 + wisk * iqr
        keep = (t_detached >= lower) & (t_detached <= upper_bound)
        step = max(1, n // _HIST_SAMPLE)
        stats.update(
            kept=float(keep.sum()),
            lower=float(lower),
            upper=float(upper_bound),
            mean_neg_sim=float(t_detached.mean()),
            neg_sims=t_detached[::step].float().cpu(),
        )
    # Q1 and Q3 are elements of P-, so K is never empty.
    return torch.logsumexp(s * t[keep], dim=0), stats
