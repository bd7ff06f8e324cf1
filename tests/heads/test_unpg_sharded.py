"""Sharded UNPG (issue 13): pair ownership, exact distributed selection, and the head.

- ``order_statistics`` equals ``torch.sort`` of the concatenated values bit for bit
  (random, tied, constant, signed zeros, infinities, NaN holes; float32/float64),
  in one process and across 3 gloo ranks with uneven shards.
- ``owned_pairs`` assigns every unordered pair to exactly one row, ~N/2 per row.
- ``PartialFC`` with ``UNPG(sharded=True)`` equals the replicated computation
  (``sharded=False``) and the dense reference: loss to 1e-12, gradients to 1e-9,
  float64, world sizes 1-4, uneven batches, tied similarities, all negatives
  equal, one label (term absent).
"""
import math

import pytest
import torch

from tests.distributed import run_world
from tests.heads.reference import MARGINS, make_margin, rank_step, reference_loss
from trainer.collectives import _histogram, order_statistics
from trainer.heads import UNPG, PartialFC
from trainer.heads.unpg import owned_pairs

DTYPES = [torch.float32, torch.float64]


# ---------------------------------------------------------------- selection
def _data(kind, dtype, n=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    if kind == "tied":  # few distinct values, both signed zeros
        v = torch.randint(-3, 4, (n,), generator=g).to(dtype) / 4
        v[::7] = -0.0
        return v
    if kind == "constant":
        return torch.full((n,), -0.37, dtype=dtype)
    if kind == "special":  # infinities, subnormals, extremes, holes
        v = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
        fi = torch.finfo(dtype)
        v[:6] = torch.tensor([float("inf"), -float("inf"), fi.tiny / 8, -fi.tiny / 8, fi.max, fi.min], dtype=dtype)
        v[10::5] = float("nan")
        return v
    raise ValueError(kind)


def _positions(n):
    return torch.stack([n // 4, (3 * n) // 4, n * 0, n - 1, n // 2])


def _expected(values):
    kept = values[~torch.isnan(values)]
    srt = torch.sort(kept).values
    n = kept.numel()
    return srt[torch.tensor([n // 4, 3 * n // 4, 0, n - 1, n // 2])], n


def _same_bits(a, b):
    """Equal values; a zero must be +0.0 (the canonical key)."""
    assert torch.equal(a, b), (a, b)
    zeros = a == 0
    assert not torch.signbit(a[zeros]).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "tied", "constant", "special"])
@pytest.mark.parametrize("chunk", [1 << 22, 333])
def test_order_statistics_single_process(dtype, kind, chunk):
    values = _data(kind, dtype)
    got, n = order_statistics(values.reshape(40, 50), _positions, chunk_elements=chunk)
    want, want_n = _expected(values)
    assert int(n) == want_n
    _same_bits(got, want)
    # and torch.kthvalue agrees (1-based)
    kept = values[~torch.isnan(values)]
    assert got[0] == torch.kthvalue(kept, want_n // 4 + 1).values


def test_order_statistics_rejects_other_dtypes():
    with pytest.raises(TypeError, match="float32 or float64"):
        order_statistics(torch.zeros(3, dtype=torch.float16), _positions)


def test_histogram_paths_agree():
    index = torch.randint(0, 17, (1000,))
    device_path = torch.zeros(17, dtype=torch.int64).index_add_(0, index, torch.ones(1, dtype=torch.int64).expand(1000))
    assert torch.equal(_histogram(index, 17), device_path)


SHARDS = [700, 0, 1300]  # uneven, one empty rank


def _selection_worker(rank, world):
    out = {}
    for dtype in DTYPES:
        for kind in ["random", "tied", "constant", "special"]:
            values = _data(kind, dtype)
            lo = sum(SHARDS[:rank])
            got, n = order_statistics(values[lo : lo + SHARDS[rank]], _positions, chunk_elements=256)
            out[(dtype, kind)] = (got, int(n))
    return out


def test_order_statistics_across_ranks():
    results = run_world(_selection_worker, len(SHARDS))
    for dtype in DTYPES:
        for kind in ["random", "tied", "constant", "special"]:
            want, want_n = _expected(_data(kind, dtype))
            for rank in range(len(SHARDS)):
                got, n = results[rank][(dtype, kind)]
                assert n == want_n
                _same_bits(got, want)


# ---------------------------------------------------------------- ownership
@pytest.mark.parametrize("n_rows", [1, 2, 3, 4, 7, 10, 13])
def test_every_pair_owned_once_and_balanced(n_rows):
    gi, hi = owned_pairs(0, n_rows, n_rows)
    cols = torch.arange(n_rows).unsqueeze(0)
    owned = ((cols > gi) & (cols <= hi)) | (cols <= hi - n_rows)
    assert not owned.diagonal().any()
    assert torch.equal(owned | owned.t(), ~torch.eye(n_rows, dtype=torch.bool))
    assert not (owned & owned.t()).any()
    per_row = owned.sum(1)
    assert per_row.max() - per_row.min() <= 1
    assert int(per_row.sum()) == n_rows * (n_rows - 1) // 2
    # a sub-range of rows gives the same rows of the matrix
    gi2, hi2 = owned_pairs(2, n_rows, n_rows) if n_rows > 2 else (gi[:0], hi[:0])
    assert torch.equal(gi2, gi[2:]) and torch.equal(hi2, hi[2:])


def test_switch_rule():
    assert UNPG().use_sharded(2) and not UNPG().use_sharded(1)
    assert UNPG(sharded=True).use_sharded(1) and not UNPG(sharded=False).use_sharded(8)
    assert not UNPG(negatives="local").use_sharded(4)
    with pytest.raises(ValueError, match="global"):
        UNPG(negatives="local", sharded=True)
    with pytest.raises(ValueError, match="sharded"):
        UNPG(sharded="yes")


# ---------------------------------------------------------------- the head
D, C = 6, 11
BATCHES = {1: [13], 2: [7, 5], 3: [6, 2, 5], 4: [4, 1, 5, 3]}
# name -> (margin, s, wisk, chunk_elements)
HEAD_CASES = {
    "random": ("arcface", 16.0, 1.5, None),
    "random-chunked": ("cosface", 32.0, 0.0, 7),
    "ties": ("combined", 16.0, 1.0, 11),
    "all-negatives-equal": ("arcface", 16.0, 1.5, None),
    "one-label": ("cosface", 16.0, 1.5, None),
}


def _case_data(name, n_rows):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n_rows, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (n_rows,), generator=g)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    if name == "ties":  # duplicate embeddings: many exactly tied similarities
        x = x[torch.randint(0, 3, (n_rows,), generator=g)] * (1 + torch.arange(n_rows, dtype=torch.float64)).unsqueeze(
            1
        )
        labels[:2] = labels[2]
    elif name == "all-negatives-equal":  # every row along e_0: every t_ij is exactly 1
        x = torch.zeros(n_rows, D, dtype=torch.float64)
        x[:, 0] = 2.0
    elif name == "one-label":
        labels[:] = 4
    return x, labels, w


def _head_worker(rank, world, sizes):
    n_rows = sum(sizes)
    out = {}
    for name, (kind, s, wisk, chunk) in HEAD_CASES.items():
        x, labels, w = _case_data(name, n_rows)
        for sharded in (True, False):
            head = PartialFC(make_margin(kind, s), D, C, unpg=UNPG(wisk=wisk, sharded=sharded),
                             dtype=torch.float64, chunk_elements=chunk)
            loss, local_x = rank_step(head, x, labels, w, sizes, rank)
            stats = {k: v for k, v in head.last_stats.items()}
            out[(name, sharded)] = (loss.detach(), local_x.grad, head.weight.grad, head.class_range, stats)
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharded_head_matches_replicated_and_reference(world):
    sizes = BATCHES[world]
    results = run_world(_head_worker, world, sizes)
    for name, (kind, s, wisk, _) in HEAD_CASES.items():
        x, labels, w = _case_data(name, sum(sizes))
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        ref = reference_loss(xr, labels, wr, kind, MARGINS[kind], s, wisk)
        ref.backward()
        lo = 0
        for rank in range(world):
            loss, gx, gw, (start, stop), stats = results[rank][(name, True)]
            r_loss, r_gx, r_gw, _, r_stats = results[rank][(name, False)]
            for a, b, tol in [(loss, ref.detach(), 1e-12), (loss, r_loss, 1e-12),
                              (gx, xr.grad[lo : lo + sizes[rank]], 1e-9), (gx, r_gx, 1e-9),
                              (gw, wr.grad[start:stop], 1e-9), (gw, r_gw, 1e-9)]:
                torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"{name} rank {rank}")
            # Same statistics, global values on every rank.
            assert stats["neg_pairs"] == r_stats["neg_pairs"], name
            assert stats["kept"] == r_stats["kept"], name
            for key in ("lower", "upper", "mean_neg_sim", "mean_pos_sim"):
                a, b = stats[key], r_stats[key]
                assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-12, (name, key, a, b)
            # Small batches: the sample is every negative similarity, on both paths (NaN: holes,
            # fixed sample positions that are not negative pairs; the monitor drops them).
            def sample(st):
                v = st["neg_sims"]
                return v[~torch.isnan(v)].sort().values
            torch.testing.assert_close(sample(stats), sample(r_stats), rtol=0, atol=1e-6)
            assert sample(stats).numel() == stats["neg_pairs"]
            if name == "one-label":
                assert stats["neg_pairs"] == 0 and stats["kept"] == 0
            if name == "all-negatives-equal":
                assert stats["lower"] == stats["upper"] == 1.0 and stats["kept"] == stats["neg_pairs"]
            lo += sizes[rank]


# ------------------------------------------------- the term alone, an empty rank
TERM_SIZES = [5, 0, 4]


def _term_worker(rank, world):
    import torch.nn.functional as F

    from trainer.heads.unpg import sharded_metric_negatives_lse

    x, labels, _ = _case_data("random", sum(TERM_SIZES))
    leaf = x.clone().requires_grad_(True)
    v, stats = sharded_metric_negatives_lse(F.normalize(leaf, dim=1), labels, TERM_SIZES, 16.0, 1.0,
                                            chunk_elements=3)
    v.backward()
    return v.detach(), leaf.grad, stats["kept"], stats["neg_pairs"]


def test_term_with_an_empty_rank_matches_replicated():
    import torch.nn.functional as F

    from trainer.heads.unpg import metric_negatives_lse

    results = run_world(_term_worker, len(TERM_SIZES))
    x, labels, _ = _case_data("random", sum(TERM_SIZES))
    leaf = x.clone().requires_grad_(True)
    v, stats = metric_negatives_lse(F.normalize(leaf, dim=1), labels, 16.0, 1.0)
    v.backward()
    grad_sum = sum(r[1] for r in results)  # what the all-gather's backward adds up
    for v_r, _, kept, pairs in results:
        torch.testing.assert_close(v_r, v.detach(), rtol=1e-12, atol=1e-12)
        assert (kept, pairs) == (stats["kept"], stats["neg_pairs"])
    torch.testing.assert_close(grad_sum, leaf.grad, rtol=1e-9, atol=1e-12)
