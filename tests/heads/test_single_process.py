"""Single process, float64: loss and gradients equal the dense reference (docs/design.md §1)."""
import math

import pytest
import torch

from tests.heads.reference import MARGINS, make_margin, reference_loss
from trainer.heads import UNPG, ArcFace, CosFace, PartialFC, PartialFCSGD

D, C = 8, 7
LABELS = {
    "distinct": [0, 3, 5, 1, 6, 2],
    "repeated": [0, 3, 3, 1, 0, 6, 3, 2, 1, 5, 3, 4],
    "single": [4, 4, 4, 4, 4],
}


def _inputs(labels, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), D, generator=g, dtype=torch.float64)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    return x, torch.tensor(labels), w


def _head(kind, s, wisk, w, negatives="global", **kw):
    unpg = None if wisk is None else UNPG(wisk=wisk, negatives=negatives)
    head = PartialFC(make_margin(kind, s), D, C, unpg=unpg, dtype=torch.float64, **kw)
    with torch.no_grad():
        head.weight.copy_(w)
    return head


@pytest.mark.parametrize("kind", sorted(MARGINS))
@pytest.mark.parametrize("wisk", [None, 0.0, 1.0, 1.5])
@pytest.mark.parametrize("pattern", sorted(LABELS))
@pytest.mark.parametrize("chunk_elements", [None, 20])  # one chunk / several chunks
def test_loss_and_gradients_match_reference(kind, wisk, pattern, chunk_elements):
    x, y, w = _inputs(LABELS[pattern])
    s = 16.0
    head = _head(kind, s, wisk, w, chunk_elements=chunk_elements)
    x1 = x.clone().requires_grad_(True)
    loss = head(x1, y)
    loss.backward()

    x2 = x.clone().requires_grad_(True)
    w2 = w.clone().requires_grad_(True)
    ref = reference_loss(x2, y, w2, kind, MARGINS[kind], s, wisk)
    ref.backward()

    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(head.weight.grad, w2.grad, rtol=1e-9, atol=1e-11)


def test_unpg_changes_the_loss_and_single_label_makes_it_vanish():
    x, y, w = _inputs(LABELS["repeated"])
    plain = _head("arcface", 64.0, None, w)(x, y)
    with_unpg = _head("arcface", 64.0, 1.5, w)(x, y)
    assert with_unpg > plain  # extra positive terms in every denominator
    xs, ys, _ = _inputs(LABELS["single"])
    assert _head("arcface", 64.0, 1.5, w)(xs, ys) == _head("arcface", 64.0, None, w)(xs, ys)


def test_statistics_match_definition():
    x, y, w = _inputs(LABELS["repeated"])
    head = _head("cosface", 64.0, 1.0, w)
    head(x, y)
    st = head.last_stats
    x_hat = x / x.norm(dim=1, keepdim=True)
    sims = x_hat @ x_hat.t()
    neg = [float(sims[i, j]) for i in range(len(y)) for j in range(i + 1, len(y)) if y[i] != y[j]]
    pos = [float(sims[i, j]) for i in range(len(y)) for j in range(i + 1, len(y)) if y[i] == y[j]]
    srt = sorted(neg)
    q1, q3 = srt[math.floor(0.25 * len(srt))], srt[math.floor(0.75 * len(srt))]
    lo, hi = q1 - (q3 - q1), q3 + (q3 - q1)
    assert st["neg_pairs"] == len(neg)
    assert st["kept"] == sum(lo <= t <= hi for t in neg)
    assert st["lower"] == pytest.approx(lo) and st["upper"] == pytest.approx(hi)
    assert st["mean_pos_sim"] == pytest.approx(sum(pos) / len(pos))
    assert st["mean_neg_sim"] == pytest.approx(sum(neg) / len(neg))


def test_whisker_filter_drops_outliers():
    # One far-out negative pair must fall outside Q3 + w*IQR and not be kept.
    torch.manual_seed(0)
    x = torch.randn(10, D, dtype=torch.float64)
    x[1] = x[0] + 1e-3  # label differs from 0 -> an extreme negative similarity ~1
    y = torch.arange(10) % C
    head = _head("arcface", 64.0, 0.0, torch.randn(C, D, dtype=torch.float64))
    head(x, y)
    assert head.last_stats["kept"] < head.last_stats["neg_pairs"]
    assert head.last_stats["upper"] < 0.99


def test_straight_through_option_matches_insightface_gradient():
    x, y, w = _inputs(LABELS["repeated"])
    exact = _head("arcface", 16.0, None, w)
    st = PartialFC(ArcFace(s=16.0, m=0.5, straight_through=True), D, C, dtype=torch.float64)
    with torch.no_grad():
        st.weight.copy_(w)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    l1, l2 = exact(x1, y), st(x2, y)
    torch.testing.assert_close(l1, l2)  # same value...
    l1.backward()
    l2.backward()
    assert not torch.allclose(x1.grad, x2.grad)  # ...different gradient
    # straight-through: the target logit back-propagates as s * cos (CosFace m=0 gradient shape)
    x3 = x.clone().requires_grad_(True)
    w3 = w.clone().requires_grad_(True)
    x_hat, w_hat = x3 / x3.norm(dim=1, keepdim=True), w3 / w3.norm(dim=1, keepdim=True)
    cos = x_hat @ w_hat.t()
    with torch.no_grad():
        tgt = torch.cos(torch.acos(cos[torch.arange(len(y)), y]) + 0.5)
        shift = torch.zeros_like(cos)
        shift[torch.arange(len(y)), y] = tgt - cos[torch.arange(len(y)), y]
    z = 16.0 * (cos + shift)
    torch.nn.functional.cross_entropy(z, y).backward()
    torch.testing.assert_close(x2.grad, x3.grad)


def test_pi_fallback_is_monotonic():
    m = ArcFace(s=1.0, m=0.5, pi_fallback=True)
    c = torch.linspace(-1, 1, 2001, dtype=torch.float64)
    v = m.value(c)
    assert bool((v[1:] >= v[:-1]).all())  # target logit never rises as theta grows
    exact = ArcFace(s=1.0, m=0.5).value(c)
    assert bool((exact[1:] < exact[:-1]).any())  # the exact one does, beyond pi - m


@pytest.mark.parametrize("bad", [[0, 7, 2], [0, -1, 2]])
def test_out_of_range_labels_are_named(bad):
    head = PartialFC(CosFace(s=64.0, m=0.4), D, C)
    with pytest.raises(ValueError, match=str(bad[1])):
        head(torch.randn(3, D), torch.tensor(bad))


def test_non_integer_labels_are_named():
    head = PartialFC(CosFace(s=64.0, m=0.4), D, C)
    with pytest.raises(ValueError, match="2.5"):
        head(torch.randn(3, D), torch.tensor([0.0, 2.5, 1.0]))
    with pytest.raises(ValueError, match="integer"):
        head(torch.randn(3, D), torch.tensor([True, False, True]))


def test_bad_embedding_shape():
    head = PartialFC(CosFace(s=64.0, m=0.4), D, C)
    with pytest.raises(ValueError, match=r"\[batch, 8\]"):
        head(torch.randn(3, D + 1), torch.tensor([0, 1, 2]))


def test_bf16_autocast_within_tolerance_of_float32():
    torch.manual_seed(0)
    backbone = torch.nn.Linear(32, 64)
    head = PartialFC(ArcFace(s=64.0, m=0.5), 64, 50, unpg=UNPG(wisk=1.5))
    inp = torch.randn(64, 32)
    y = torch.randint(0, 50, (64,))
    ref = head(backbone(inp), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = backbone(inp)
        assert emb.dtype == torch.bfloat16
        loss = head(emb, y)
    assert loss.dtype == torch.float32
    # Stated tolerance: bf16 embeddings (8-bit mantissa) move the loss by < 0.5 %.
    assert abs(float(loss) - float(ref)) / float(ref) < 5e-3
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in backbone.parameters())


def test_dense_optimizer_equals_torch_sgd():
    x, y, w = _inputs(LABELS["repeated"])
    head = _head("arcface", 16.0, 1.5, w)
    ref_w = torch.nn.Parameter(w.clone())
    ours = PartialFCSGD(head, lr=0.05, momentum=0.9, weight_decay=5e-4)
    theirs = torch.optim.SGD([ref_w], lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _step in range(3):
        ours.zero_grad()
        theirs.zero_grad()
        head(x, y).backward()
        reference_loss(x, y, ref_w, "arcface", MARGINS["arcface"], 16.0, 1.5).backward()
        ours.step()
        theirs.step()
    torch.testing.assert_close(head.weight.detach(), ref_w.detach(), rtol=1e-10, atol=1e-12)


def test_sparse_gradients_accumulate_over_two_backward_passes():
    """Two micro-steps sample different centres: rows repeat in the accumulated
    sparse gradient and the optimizer must sum them (one update per row)."""
    torch.manual_seed(3)
    x, y, w = _inputs(LABELS["repeated"])
    c_big = 60
    w = torch.randn(c_big, D, dtype=torch.float64)
    head = PartialFC(make_margin("cosface", 16.0), D, c_big, sample_rate=0.3, unpg=UNPG(wisk=1.5),
                     dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(w)
    opt = PartialFCSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    dense_sum = torch.zeros_like(w)
    for labels in (y, (y * 7 + 1) % c_big):
        before = head.weight.grad.to_dense().clone() if head.weight.grad is not None else 0
        head(x, labels).backward()
        dense_sum += head.weight.grad.to_dense() - before
    rows = torch.nonzero(dense_sum.abs().sum(1)).squeeze(1)
    opt.step()
    expect = w.clone()
    expect[rows] = w[rows] - 0.1 * (dense_sum[rows] + 5e-4 * w[rows])
    torch.testing.assert_close(head.weight.detach(), expect, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("chunk_rows", [None, 1, 2, 3])
def test_sparse_step_sums_repeated_rows_without_coalesce(chunk_rows):
    """An uncoalesced gradient with repeated, unsorted rows (as concatenated backward
    passes may give): one update per row with the row's summed gradient, momentum too,
    whatever the update chunks (repeats in the same chunk and in later chunks)."""
    torch.manual_seed(5)
    p = torch.nn.Parameter(torch.randn(8, D, dtype=torch.float64))
    w0 = p.detach().clone()
    opt = PartialFCSGD([p], lr=0.1, momentum=0.9, weight_decay=5e-4,
                       chunk_elements=None if chunk_rows is None else chunk_rows * D)
    buf = torch.randn(8, D, dtype=torch.float64)
    opt.state[p]["momentum_buffer"].copy_(buf)
    rows = torch.tensor([5, 1, 5, 3, 1, 5, 0])
    values = torch.randn(rows.numel(), D, dtype=torch.float64)
    p.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values, p.shape)
    assert not p.grad.is_coalesced()
    opt.step()
    g = torch.zeros(8, D, dtype=torch.float64).index_add_(0, rows, values)
    used = torch.tensor([0, 1, 3, 5])
    expect_buf = buf.clone()
    expect_buf[used] = 0.9 * buf[used] + g[used] + 5e-4 * w0[used]
    expect_w = w0.clone()
    expect_w[used] = w0[used] - 0.1 * expect_buf[used]
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], expect_buf, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(p.detach(), expect_w, rtol=1e-12, atol=1e-14)


def test_bad_label_after_the_first_step_is_reported_at_the_check_point():
    head = PartialFC(CosFace(s=64.0, m=0.4), D, C, unpg=UNPG())
    head(torch.randn(3, D), torch.tensor([0, 1, 2]))  # the eager check passes
    head.check_inputs()
    head(torch.randn(3, D), torch.tensor([0, 1, 2]))
    loss = head(torch.randn(3, D), torch.tensor([1, C + 4, 2]))  # recorded, not raised (no sync)
    assert torch.isfinite(loss)
    head(torch.randn(3, D), torch.tensor([-3, 1, 2]))  # a later bad step: the first is reported
    with pytest.raises(ValueError, match=rf"step 3 .*rank 0.*\[{C + 4}\]"):
        head.check_inputs()
    head.check_inputs()  # reported once


def test_sampling_keeps_a_fixed_count_and_every_positive():
    c_big = 200
    head = PartialFC(CosFace(s=64.0, m=0.4), D, c_big, sample_rate=0.05)
    for labels in (torch.arange(12), torch.full((12,), 7), torch.arange(12) * 16):
        head(torch.randn(12, D), labels)
        used = head.sampled_classes
        assert used.numel() == max(10, 12) == head.num_sampled(12)
        assert set(labels.tolist()) <= set(used.tolist())
        assert torch.equal(used, used.unique())
    small = PartialFC(CosFace(s=64.0, m=0.4), D, 20, sample_rate=0.5)
    small(torch.randn(30, D), torch.randint(0, 20, (30,)))
    assert small.sampled_classes.numel() == 20  # min(C_local, ...)
