"""UNPG's metric negatives: the box-and-whisker-filtered negative pairs (docs/design.md §1).

For embeddings ``x^`` (L2-normalised) with labels ``y``:

    P-  = {(i, j): i < j, y_i != y_j},   t_ij = <x^_i, x^_j>
    Q1  = t_(floor(0.25 n)), Q3 = t_(floor(0.75 n))   (0-based order statistics, n = |P-|)
    K   = {t in P-: Q1 - w IQR <= t <= Q3 + w IQR}
    V   = log sum_{t in K} exp(s t)

The loss uses ``V`` once per row as an extra denominator term:
``log(sum_c exp(z_ic) + exp(V))`` — a scalar, never an N x |K| matrix. The
bounds are exact order statistics read at device-side positions (a radix
selection over the masked pairs, ``collectives.order_statistics``) computed without
gradient; gradient flows through every kept ``t_ij``. No step reads anything on
the host: the pair set is a mask, ``n`` a device tensor, ``V = -inf`` without
a negative pair, and the statistics are 0-dim device tensors.

Two ways to compute ``V`` over the global batch (``negatives="global"``):

- replicated (:func:`metric_negatives_lse`): every rank builds the N x N
  similarities of the gathered batch and selects the quartiles itself;
- sharded (:func:`sharded_metric_negatives_lse`): rank r owns a balanced share
  of the pairs (its own rows i against the gathered batch, pair {i, j} owned by
  exactly one of its two rows, see :func:`owned_pairs`), so it stores a
  [B_r, N/2] band of similarities, never N x N. Q1 and Q3 are exact global order statistics
  (``collectives.order_statistics``: radix selection with all-reduced digit
  counts), ``V`` is combined with all-reduce MAX / SUM, and each rank's backward
  sends the gradient of its own pairs only (no 1/R scaling: nothing is replicated).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, cast

import torch

from trainer.collectives import (
    ProcessGroup,
    all_gather_rows,
    all_reduce_,
    order_statistics,
    world_info,
)
from trainer.heads.config import NEGATIVE_MODES, wisk_ok

_HIST_SAMPLE = 4096  # negative similarities kept for monitoring histograms


@dataclass(frozen=True, kw_only=True)
class UNPG:
    """Configuration of the UNPG term.

    wisk: whisker length ``w`` of the box-and-whisker filter (paper: 1.0-1.5).
    negatives: "global" pairs over the all-gathered global batch (default) or
        "local": each row's pairs come from its own rank's batch only (what the
        authors' single-GPU code does; kept for ablations).
    sharded: how "global" pairs are computed. ``None`` (default): sharded when
        the world size is > 1, replicated in one process; ``True``: always
        sharded (also in one process); ``False``: always replicated (every rank
        computes all N^2 pairs; the reference the sharded path is tested against).
        Both give the same loss and gradients; sharded costs O(B_r N) per rank
        instead of O(N^2). Not applicable to "local" negatives.
    """

    wisk: float = 1.5
    negatives: str = "global"
    sharded: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.negatives not in NEGATIVE_MODES:
            raise ValueError(f"UNPG.negatives must be one of {NEGATIVE_MODES}, got {self.negatives!r}")
        if not wisk_ok(self.wisk):
            raise ValueError(f"UNPG.wisk must be a finite number >= 0, got {self.wisk!r}")
        if self.sharded not in (None, True, False):
            raise ValueError(f"UNPG.sharded must be None, True or False, got {self.sharded!r}")
        if self.sharded and self.negatives != "global":
            raise ValueError('UNPG.sharded=True applies to negatives="global" only')

    def use_sharded(self, world_size: int) -> bool:
        """Whether "global" negatives are computed sharded at this world size."""
        if self.negatives != "global":
            return False
        return world_size > 1 if self.sharded is None else bool(self.sharded)


def _quartile_positions(n: torch.Tensor) -> torch.Tensor:
    """``[floor(0.25 n), floor(0.75 n)]`` for an int64 count ``n`` (exactly, on the device)."""
    return torch.stack([n // 4, (3 * n) // 4])


def metric_negatives_lse(
    x_hat: torch.Tensor, labels: torch.Tensor, s: float, wisk: float
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``V = log sum_{t in K} exp(s t)`` and monitoring statistics (0-dim device tensors).

    ``V = -inf`` when there is no negative pair (every label equal): the UNPG term
    is then absent (docs/design.md §1; ``logaddexp(lse, -inf) == lse``). Fixed
    shapes throughout: the pairs are a mask over the N x N similarities, the
    quartiles are selected from the masked values at device-side positions,
    and the log-sum-exp runs over the masked matrix (no host sync).
    """
    n_rows = x_hat.shape[0]
    sims = x_hat @ x_hat.t()  # [N, N]
    upper = torch.ones(n_rows, n_rows, dtype=torch.bool, device=x_hat.device).triu_(1)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    neg_mask = upper & ~same
    nan = float("nan")
    with torch.no_grad():
        t = sims.detach()
        n = neg_mask.sum()
        pos_mask = upper & same
        pos_n = pos_mask.sum()
        holes = torch.where(neg_mask, t, nan)  # NaN: not a value
        # exact selection (radix, positions computed on the device from the device count n);
        # values at out-of-range positions (n = 0) are unspecified and masked below
        (q1, q3), _ = order_statistics(holes, _quartile_positions, local_only=True)
        holes = holes.reshape(-1)
        iqr = q3 - q1
        lower, upper_bound = q1 - wisk * iqr, q3 + wisk * iqr
        keep = neg_mask & (t >= lower) & (t <= upper_bound)
        has = n > 0
        zero = t.new_zeros(())
        step = max(1, holes.numel() // _HIST_SAMPLE)
        stats: Dict[str, torch.Tensor] = {
            "neg_pairs": n.to(torch.float64),
            "mean_pos_sim": torch.where(pos_mask, t, zero).sum(dtype=torch.float64) / pos_n,  # 0/0: NaN
            "kept": keep.sum().to(torch.float64),
            "lower": torch.where(has, lower, nan),
            "upper": torch.where(has, upper_bound, nan),
            "mean_neg_sim": torch.where(neg_mask, t, zero).sum(dtype=torch.float64) / n,
            "neg_sims": holes[::step].float(),  # NaN holes: dropped by the monitor
        }
    # Q1 and Q3 are elements of P-, so K is never empty when n > 0. Without a pair, a
    # finite dummy keeps the log-sum-exp's gradient finite; the outer where cuts it.
    z = torch.where(keep, s * sims, float("-inf"))
    z = torch.where(has, z, zero)
    v = torch.where(has, torch.logsumexp(z.reshape(-1), dim=0), float("-inf"))
    return v, stats


# ------------------------------------------------------------------------------------ sharded
def owned_pairs(row_start: int, row_stop: int, n_rows: int, device: Optional[torch.device] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ownership of pairs by rows: row i owns {i, j} iff ``1 <= (j - i) mod N <= h_i``.

    ``h_i = (N - 1) // 2``, plus one for ``i < N / 2`` when N is even (the pairs at
    distance exactly N/2 go to the lower row). Every unordered pair {i, j}, i != j,
    is owned by exactly one of its rows, and every row owns ``(N - 1) / 2`` pairs
    (N/2 or N/2 - 1 when N is even): a rank with B_r rows gets ~B_r N / 2 pairs.

    Returns ``(gi [B, 1], hi [B, 1])`` for rows ``[row_start, row_stop)``: row gi owns
    the columns j with ``gi < j <= hi`` or ``j <= hi - N`` (the band wraps around).
    """
    gi = torch.arange(row_start, row_stop, device=device).unsqueeze(1)
    h = (n_rows - 1) // 2 + ((gi < n_rows // 2) & (n_rows % 2 == 0)).long()
    return gi, gi + h


def _band(full: torch.Tensor, width: int) -> torch.Tensor:
    """``band[a, k] = full[a, a + k]``: the skewed band of a [B, B - 1 + width] matrix (a view)."""
    return full.as_strided((full.shape[0], width), (full.stride(0) + full.stride(1), full.stride(1)))


class _KeptLogSumExp(torch.autograd.Function):
    """``V = M + log S`` from the all-reduced max ``M`` and sum-exp ``S`` of the kept pairs.

    Backward (no collective): ``dV/dt_ij = s exp(s t_ij - M) / S`` for this rank's
    kept pairs only, recomputed from the stored band chunk by chunk and sent to
    both rows: row i is local, row j any row of the gathered batch.
    """

    @staticmethod
    def forward(ctx: Any, x_hat: torch.Tensor, band: torch.Tensor, cols: torch.Tensor, row_start: int,
                lower: torch.Tensor, upper: torch.Tensor, max_z: torch.Tensor, sum_exp: torch.Tensor, s: float,
                chunk_rows: int) -> torch.Tensor:
        ctx.save_for_backward(x_hat, band, cols, lower, upper, max_z, sum_exp)
        ctx.row_start, ctx.s, ctx.chunk_rows = row_start, s, chunk_rows
        return (max_z + torch.log(sum_exp.to(max_z.dtype))).detach()

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        grad_v = grad_outputs[0]
        x_hat: torch.Tensor
        band: torch.Tensor
        lower: torch.Tensor
        upper: torch.Tensor
        max_z: torch.Tensor
        sum_exp: torch.Tensor
        x_hat, band, _cols, lower, upper, max_z, sum_exp = ctx.saved_tensors
        lo: int = ctx.row_start
        s: float = ctx.s
        chunk_rows: int = ctx.chunk_rows
        rows, width = band.shape
        n_rows = x_hat.shape[0]
        # No kept pair (V = -inf): nothing to send back (and no 0/0).
        total = sum_exp.to(grad_v.dtype)
        scale = torch.where(total > 0, grad_v * s / torch.where(total > 0, total, 1.0), 0.0).to(x_hat.dtype)
        # Gradients go straight into the [N, D] result: the columns a chunk reaches are rows
        # lo + 1 + a ... (mod N) of x_hat, at most two contiguous pieces (views, no copies).
        grad = torch.zeros_like(x_hat)
        zero = torch.zeros((), dtype=band.dtype, device=band.device)
        for a in range(0, rows, chunk_rows):
            t = band[a : a + chunk_rows]
            c = t.shape[0]
            kept = (t >= lower) & (t <= upper)  # NaN holes compare False
            w = band.new_zeros(c, c - 1 + width)
            _band(w, width).copy_(torch.where(kept, torch.exp(s * t - max_z), zero) * scale)
            x_rows, g_rows = x_hat[lo + a : lo + a + c], grad[lo + a : lo + a + c]
            for k0, r0, r1 in _wrapped_pieces(lo + 1 + a, c - 1 + width, n_rows):
                wk = w[:, k0 : k0 + r1 - r0]
                g_rows.addmm_(wk, x_hat[r0:r1])  # d t_ij / d x_i = x_j
                grad[r0:r1].addmm_(wk.t(), x_rows)  # d t_ij / d x_j = x_i
        return grad, None, None, None, None, None, None, None, None, None


def _wrapped_pieces(start: int, count: int, n_rows: int) -> List[Tuple[int, int, int]]:
    """Rows ``start, start + 1, ..., start + count - 1`` (mod N) as contiguous pieces
    ``(offset in the run, first row, stop row)``; ``count <= N``."""
    out: List[Tuple[int, int, int]] = []
    k = 0
    while k < count:
        r0 = (start + k) % n_rows
        r1 = min(n_rows, r0 + count - k)
        out.append((k, r0, r1))
        k += r1 - r0
    return out


def _sample_positions(numel: int, world_size: int) -> Tuple[int, int]:
    """(stride, count) of the fixed positions each rank samples for the histogram."""
    want = max(1, -(-_HIST_SAMPLE // world_size))
    stride = max(1, numel // want)
    return stride, -(-numel // stride) if numel else 0


def sharded_metric_negatives_lse(
    x_hat: torch.Tensor,
    labels: torch.Tensor,
    sizes: Sequence[int],
    s: float,
    wisk: float,
    group: ProcessGroup = None,
    chunk_elements: int = 1 << 20,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``V`` over the global batch with this rank computing only the pairs it owns.

    ``x_hat [N, D]``: the gathered, L2-normalised global batch (with gradient
    through the gather); ``labels [N]``; ``sizes[r]``: the row count of rank r
    (rank order, summing to N). Every rank of ``group`` calls it with the same
    arguments (and its own graph). Returns the same ``V`` on every rank (``-inf``
    without negative pairs) and the global statistics, with the meaning of
    :func:`metric_negatives_lse`'s.

    Rank r's rows i own the pairs ``j = i + 1 .. i + h_i (mod N)``
    (:func:`owned_pairs`): one matmul of its B_r rows against the B_r - 1 + N // 2
    columns they reach gives a [B_r, N // 2] skewed band of similarities, the
    only O(B_r N) buffer (positive pairs and the one unowned corner are NaN
    holes). It is read in row chunks of ``chunk_elements``: 2 (float32) or 4
    (float64) all-reduces of 2 x 65536 counts for the quartiles, one MAX and one
    SUM for ``V`` and one small all-gather for the histogram sample; the
    statistics stay on the device (no host sync).
    """
    n_rows = x_hat.shape[0]
    device, dtype = x_hat.device, x_hat.dtype
    rank, world = world_info(group)
    sizes = [int(b) for b in sizes]  # a list from here on
    if len(sizes) != world or sum(sizes) != n_rows:
        raise ValueError(f"rank {rank}: sizes {sizes} do not split the global batch of {n_rows} rows "
                         f"over {world} rank(s)")
    lo, count = sum(sizes[:rank]), sizes[rank]
    width = n_rows // 2  # the widest band: h_i <= N // 2
    # Row chunks of at most chunk_elements and at most 1/8 of the band: the passes'
    # temporaries (a few chunk-sized float/int buffers) stay well below the band itself.
    chunk_rows = max(1, min(chunk_elements // max(1, width), -(-sizes[rank] // 8)))
    chunk_elements = chunk_rows * width
    gi, hi = owned_pairs(lo, lo + count, n_rows, device)
    reach = count - 1 + width if count else 0  # columns lo + 1 .. lo + count - 1 + width (mod N)
    cols = (torch.arange(reach, device=device) + lo + 1) % n_rows
    col_labels = _band(labels.index_select(0, cols).unsqueeze(0).expand(count, reach), width)
    ks, h = torch.arange(width, device=device).unsqueeze(0), hi - gi  # k < h_i: owned (not the corner)

    def zero64() -> torch.Tensor:
        return torch.zeros((), dtype=torch.float64, device=device)

    zero = torch.zeros((), dtype=dtype, device=device)
    with torch.no_grad():
        xd = x_hat.detach()
        full = xd[lo : lo + count] @ xd.index_select(0, cols).t()  # [B, B - 1 + width]
        band = _band(full, width)  # band[a, k] = t(lo + a, lo + a + 1 + k mod N)
        pos_count, pos_sum = zero64(), zero64()
        for a in range(0, count, chunk_rows):
            b = min(count, a + chunk_rows)
            t = band[a:b]
            same = col_labels[a:b] == labels[lo + a : lo + b].unsqueeze(1)
            in_band = ks < h[a:b]
            pos = same & in_band
            pos_count += pos.sum()
            pos_sum += torch.where(pos, t, zero).sum(dtype=torch.float64)
            t.masked_fill_(same | ~in_band, float("nan"))

        def quartile_ranks(n: torch.Tensor) -> torch.Tensor:
            return torch.stack([n // 4, (3 * n) // 4])  # floor(0.25 n), floor(0.75 n), exactly

        (q1, q3), n = order_statistics(band, quartile_ranks, group, chunk_elements)
        iqr = q3 - q1
        lower, upper_bound = q1 - wisk * iqr, q3 + wisk * iqr
        # Local log-sum-exp of the kept s*t (running max over chunks), then across ranks.
        neg_inf = torch.full((), float("-inf"), dtype=dtype, device=device)

        def finite(m: torch.Tensor) -> torch.Tensor:
            return torch.where(m == float("-inf"), zero, m)

        local_max, local_sum = neg_inf, zero64()
        kept_count, neg_sum = zero64(), zero64()
        for a in range(0, count, chunk_rows):
            t = band[a : a + chunk_rows]
            kept = (t >= lower) & (t <= upper_bound)
            kept_count += kept.sum()
            neg_sum += torch.nansum(t, dtype=torch.float64)
            z = torch.where(kept, s * t, neg_inf)
            new_max = torch.maximum(local_max, z.amax())
            local_sum = local_sum * torch.exp(finite(local_max) - finite(new_max)).double() + torch.exp(
                z - finite(new_max)
            ).sum(dtype=torch.float64)
            local_max = new_max
        max_z = all_reduce_(local_max.clone(), "max", group)
        sums = torch.stack([local_sum * torch.exp(finite(local_max) - finite(max_z)).double(),
                            kept_count, neg_sum, pos_count, pos_sum])
        sum_exp, kept_total, neg_total, pos_total, pos_sim_total = all_reduce_(sums, "sum", group).unbind()
        # Histogram sample: fixed positions of every band (NaN holes: dropped by the monitor).
        stride, _ = _sample_positions(count * width, world)
        sample = band.reshape(-1)[::stride].double() if count * width else band.new_zeros(0, dtype=torch.float64)
        sample = all_gather_rows(sample, [_sample_positions(b * width, world)[1] for b in sizes], group)
        has = n > 0
        nan = float("nan")
        stats: Dict[str, torch.Tensor] = {
            "neg_pairs": n.to(torch.float64),
            "mean_pos_sim": pos_sim_total / pos_total,  # 0/0: NaN
            "kept": kept_total,
            "lower": torch.where(has, lower.double(), nan),
            "upper": torch.where(has, upper_bound.double(), nan),
            "mean_neg_sim": neg_total / n,
            "neg_sims": sample.float(),
        }
    # V = -inf without a kept pair (max_z = -inf, sum_exp = 0): the term is then absent.
    apply = cast(Callable[..., torch.Tensor], _KeptLogSumExp.apply)  # pyright: ignore[reportUnknownMemberType]
    v = apply(x_hat, band, cols, lo, lower, upper_bound, max_z, sum_exp, float(s), chunk_rows)
    return v, stats
