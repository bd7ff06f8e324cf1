"""AdaFace / MagFace / CurricularFace in the sharded head vs dense float64 references.

World sizes 1, 2 and 3; C = 11 (uneven class split); unequal per-rank batches;
norms spread over [3, 130] (inside and outside MagFace's [l_a, u_a] and
AdaFace's clip). Two forward steps per case: every rank's loss and gradient
slices equal the reference at each step, and the running state (buffers) after
two steps equals the reference's on every rank. Sampling (r < 1) against the
reference restricted to the sampled centres. UNPG on and off.
"""
import math

import pytest
import torch

from tests.distributed import run_world
from tests.heads.reference import rank_step
from tests.heads.reference_margins import INITIAL_STATE, PARAMS, make_margin, reference_loss
from trainer.heads import UNPG, PartialFC, class_range

D, C = 6, 11
BATCHES = {1: [9], 2: [5, 4], 3: [5, 2, 4]}
# (kind, s, param overrides, initial state overrides, wisk, negatives)
CASES = [
    ("adaface", 16.0, {}, {}, None, "global"),
    ("adaface", 32.0, dict(h=1.5, t_alpha=0.7), {}, 1.5, "global"),
    ("adaface", 16.0, dict(m=0.6, h=3.0, t_alpha=1.0), {}, 1.0, "local"),
    ("magface", 16.0, {}, {}, None, "global"),
    ("magface", 32.0, dict(lambda_g=5.0), {}, 1.0, "local"),
    ("curricularface", 16.0, {}, {}, None, "global"),
    ("curricularface", 32.0, {}, {"t": 0.3}, 1.5, "global"),
]


def _params(case):
    kind, _, over, state_over, _, _ = case
    return {**PARAMS[kind], **over}, {**INITIAL_STATE[kind], **state_over}


def _data(n_rows, n_classes, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, D, generator=g, dtype=torch.float64)
    norms = torch.empty(n_rows, 1, dtype=torch.float64).uniform_(3.0, 130.0, generator=g)
    x = x / x.norm(dim=1, keepdim=True) * norms
    labels = torch.randint(0, n_classes, (n_rows,), generator=g)
    labels[:3] = torch.tensor([2, 2, n_classes - 1])
    w = torch.randn(n_classes, D, generator=g, dtype=torch.float64)
    return x, labels, w


def _make_head(case, n_classes, sample_rate=1.0):
    kind, s, _, _, wisk, negatives = case
    params, state = _params(case)
    unpg = None if wisk is None else UNPG(wisk=wisk, negatives=negatives)
    head = PartialFC(make_margin(kind, s, params), D, n_classes, sample_rate=sample_rate, unpg=unpg,
                     dtype=torch.float64)
    for name, v in state.items():
        getattr(head.margin, name).fill_(v)
    return head


def _buffers(head):
    return {k: v.clone() for k, v in head.state_dict().items() if k.startswith("margin.")}


def _worker(rank, world, sizes):
    out = []
    for case in CASES:
        head = _make_head(case, C)
        steps = []
        for step in range(2):
            x, labels, w = _data(sum(sizes), C, seed=10 + step)
            loss, local_x = rank_step(head, x, labels, w, sizes, rank)
            steps.append((loss.detach(), local_x.grad, head.weight.grad.clone(), _buffers(head)))
        out.append((head.class_range, steps))
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_adaptive_margins_match_dense_reference(world):
    sizes = BATCHES[world]
    results = run_world(_worker, world, sizes)
    for case_idx, case in enumerate(CASES):
        kind, s, _, _, wisk, negatives = case
        params, state = _params(case)
        for step in range(2):
            x, labels, w = _data(sum(sizes), C, seed=10 + step)
            xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
            groups = sizes if negatives == "local" else None
            ref, state = reference_loss(kind, xr, labels, wr, s, params, state, wisk, groups)
            ref.backward()
            lo = 0
            for rank in range(world):
                (start, stop), steps = results[rank][case_idx]
                assert (start, stop) == class_range(C, rank, world)
                loss, gx, gw, bufs = steps[step]
                msg = f"{kind} case {case_idx} step {step} rank {rank}/{world}"
                torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12, msg=msg)
                torch.testing.assert_close(gx, xr.grad[lo:lo + sizes[rank]], rtol=1e-9, atol=1e-11, msg=msg)
                torch.testing.assert_close(gw, wr.grad[start:stop], rtol=1e-9, atol=1e-11, msg=msg)
                assert set(bufs) == {f"margin.{k}" for k in state}, msg
                for k, v in state.items():
                    assert bufs[f"margin.{k}"].dim() == 0
                    assert abs(float(bufs[f"margin.{k}"]) - v) <= 1e-12 * max(1.0, abs(v)), (msg, k)
                lo += sizes[rank]


def test_state_moves_and_norm_gradients_matter():
    """The checks above can fail: state really changes, and MagFace's norm term is non-zero."""
    x, labels, w = _data(9, C, seed=10)
    for case in CASES:
        params, state = _params(case)
        _, new_state = reference_loss(case[0], x, labels, w, case[1], params, state)
        if state:
            assert new_state != state
    # MagFace: the radial part of the gradient (through the norm) is non-zero
    head = _make_head(CASES[3], C)
    with torch.no_grad():
        head.weight.copy_(w)
    xr = x.clone().requires_grad_(True)
    head(xr, labels).backward()
    radial = (xr.grad * x).sum(1) / x.norm(dim=1)
    assert radial.abs().max() > 1e-3


def test_curricularface_mask_and_fallback_match_reference():
    # far-from-centre targets: exercises the cos(pi - m) fallback
    x, labels, w = _data(9, C, seed=3)
    w[labels[0]] = -x[0] / x[0].norm() + 0.1 * torch.randn(D, generator=torch.Generator().manual_seed(4),
                                                            dtype=torch.float64)
    cos0 = float(torch.nn.functional.cosine_similarity(x[0], w[labels[0]], dim=0))
    assert cos0 < math.cos(math.pi - 0.5)  # the fallback branch
    case = CASES[5]
    params, state = _params(case)
    head = _make_head(case, C)
    with torch.no_grad():
        head.weight.copy_(w)
    xr = x.clone().requires_grad_(True)
    loss = head(xr, labels)
    loss.backward()
    xr2, wr2 = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref, _ = reference_loss("curricularface", xr2, labels, wr2, case[1], params, state)
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xr.grad, xr2.grad, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(head.weight.grad, wr2.grad, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------ sampling
CS, RATE = 60, 0.3
SAMPLING_CASES = [("adaface", 32.0, dict(h=1.5, t_alpha=0.7), {}, 1.5, "global"),
                  ("magface", 32.0, {}, {}, 1.5, "global"),
                  ("curricularface", 32.0, {}, {"t": 0.2}, 1.5, "global")]


def _sampling_worker(rank, world, sizes):
    torch.manual_seed(100 + rank)
    out = []
    for case in SAMPLING_CASES:
        head = _make_head(case, CS, sample_rate=RATE)
        steps = []
        for step in range(2):
            x, labels, w = _data(sum(sizes), CS, seed=20 + step)
            loss, local_x = rank_step(head, x, labels, w, sizes, rank)
            steps.append(dict(loss=loss.detach(), gx=local_x.grad, grad=head.weight.grad.to_dense(),
                              sampled=head.sampled_classes.clone(), bufs=_buffers(head)))
        out.append((head.class_range, steps))
    return out


@pytest.mark.parametrize("world", [1, 3])
def test_sampling_matches_restricted_reference(world):
    sizes = BATCHES[world]
    results = run_world(_sampling_worker, world, sizes)
    for case_idx, case in enumerate(SAMPLING_CASES):
        kind, s, _, _, wisk, _ = case
        params, state = _params(case)
        for step in range(2):
            x, labels, w = _data(sum(sizes), CS, seed=20 + step)
            union = torch.cat([res[case_idx][1][step]["sampled"] for res in results])
            assert union.numel() < CS
            remap = {int(c): i for i, c in enumerate(union)}
            sub_labels = torch.tensor([remap[int(c)] for c in labels])
            xr = x.clone().requires_grad_(True)
            w_sub = w[union].clone().requires_grad_(True)
            ref, state = reference_loss(kind, xr, sub_labels, w_sub, s, params, state, wisk)
            ref.backward()
            lo = 0
            for rank, res in enumerate(results):
                (start, stop), steps = res[case_idx]
                st = steps[step]
                msg = f"{kind} step {step} rank {rank}/{world}"
                torch.testing.assert_close(st["loss"], ref.detach(), rtol=1e-12, atol=1e-12, msg=msg)
                torch.testing.assert_close(st["gx"], xr.grad[lo:lo + sizes[rank]], rtol=1e-9, atol=1e-11,
                                           msg=msg)
                pos = torch.searchsorted(union, st["sampled"])
                torch.testing.assert_close(st["grad"][st["sampled"] - start], w_sub.grad[pos], rtol=1e-9,
                                           atol=1e-11, msg=msg)
                for k, v in state.items():
                    assert math.isclose(float(st["bufs"][f"margin.{k}"]), v, rel_tol=1e-12, abs_tol=1e-12)
                lo += sizes[rank]
