"""Multi-process (gloo) head vs the dense single-process reference.

World sizes 1, 2 and 3; C = 11 (not divisible by 2 or 3); unequal per-rank batch
sizes and label composition. Every rank's loss must equal the reference over
the concatenated global batch, and its gradients the matching slices of the
reference gradients (float64, tight tolerance).
"""
import math

import pytest
import torch

from tests.distributed import run_world
from tests.heads.reference import MARGINS, make_margin, rank_step, reference_loss
from trainer.heads import UNPG, PartialFC, PartialFCSGD, class_range

D, C = 6, 11
BATCHES = {1: [9], 2: [5, 4], 3: [5, 2, 4]}
# (margin, s, wisk, negatives)
CASES = [
    ("arcface", 32.0, 1.5, "global"),
    ("cosface", 64.0, None, "global"),
    ("combined", 16.0, 1.0, "local"),
    ("arcface", 16.0, 0.0, "local"),
    ("cosface", 16.0, 0.0, "global"),
]


def _global_data(n_rows, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (n_rows,), generator=g)
    labels[:3] = torch.tensor([2, 2, 10])  # repeated labels, and the last class
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    return x, labels, w


def _dense_worker(rank, world, sizes):
    x, labels, w = _global_data(sum(sizes))
    out = []
    for kind, s, wisk, negatives in CASES:
        unpg = None if wisk is None else UNPG(wisk=wisk, negatives=negatives)
        head = PartialFC(make_margin(kind, s), D, C, unpg=unpg, dtype=torch.float64)
        loss, local_x = rank_step(head, x, labels, w, sizes, rank)
        out.append((loss.detach(), local_x.grad, head.weight.grad, head.class_range))
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_matches_dense_reference(world):
    sizes = BATCHES[world]
    results = run_world(_dense_worker, world, sizes)
    x, labels, w = _global_data(sum(sizes))
    for case_idx, (kind, s, wisk, negatives) in enumerate(CASES):
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        groups = sizes if negatives == "local" else None
        ref = reference_loss(xr, labels, wr, kind, MARGINS[kind], s, wisk, groups=groups)
        ref.backward()
        lo = 0
        for rank in range(world):
            loss, gx, gw, (start, stop) = results[rank][case_idx]
            assert (start, stop) == class_range(C, rank, world)
            torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(gx, xr.grad[lo : lo + sizes[rank]], rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(gw, wr.grad[start:stop], rtol=1e-9, atol=1e-11)
            lo += sizes[rank]


def test_class_ranges_follow_insightface_split():
    assert [class_range(11, r, 3) for r in range(3)] == [(0, 4), (4, 8), (8, 11)]
    assert [class_range(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]


# ------------------------------------------------------------------ sampling
CS, RATE, LR, WD = 90, 0.3, 0.1, 5e-4


def _sampling_worker(rank, world, sizes):
    torch.manual_seed(100 + rank)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(sum(sizes), D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, CS, (sum(sizes),), generator=g)
    w = torch.randn(CS, D, generator=g, dtype=torch.float64)
    lo = sum(sizes[:rank])
    head = PartialFC(make_margin("arcface", 16.0), D, CS, sample_rate=RATE, unpg=UNPG(wisk=1.5),
                     dtype=torch.float64)
    start, stop = head.class_range
    with torch.no_grad():
        head.weight.copy_(w[start:stop])
    opt = PartialFCSGD(head, lr=LR, momentum=0.9, weight_decay=WD)
    steps = []
    for _ in range(2):
        local_x = x[lo : lo + sizes[rank]].clone().requires_grad_(True)
        before = head.weight.detach().clone()
        opt.zero_grad()
        loss = head(local_x, labels[lo : lo + sizes[rank]])
        loss.backward()
        grad = head.weight.grad
        assert grad.is_sparse
        opt.step()
        steps.append(dict(loss=loss.detach(), gx=local_x.grad, sampled=head.sampled_classes.clone(),
                          grad=grad.to_dense(), before=before, after=head.weight.detach().clone(),
                          momentum=opt.state[head.weight]["momentum_buffer"].clone()))
    return dict(range=head.class_range, steps=steps, x=x, labels=labels, w=w)


@pytest.mark.parametrize("world", [1, 3])
def test_sampling_matches_reference_on_sampled_centres(world):
    sizes = BATCHES[world]
    results = run_world(_sampling_worker, world, sizes)
    x, labels = results[0]["x"], results[0]["labels"]
    for step in range(2):
        sampled = []
        for res in results:
            start, stop = res["range"]
            st = res["steps"][step]
            chosen = st["sampled"]
            positives = torch.unique(labels[(labels >= start) & (labels < stop)])
            assert set(positives.tolist()) <= set(chosen.tolist())
            # fixed per rank: min(C_local, max(floor(r C_local), N)), whatever the labels
            assert chosen.numel() == min(stop - start, max(math.floor(RATE * (stop - start)), len(labels)))
            assert chosen.unique().numel() == chosen.numel()
            assert chosen.min() >= start and chosen.max() < stop
            sampled.append(chosen)
        union = torch.cat(sampled)
        # Reference restricted to the sampled centres; labels remapped into that subset.
        remap = {int(c): i for i, c in enumerate(union)}
        sub_labels = torch.tensor([remap[int(c)] for c in labels])
        w_step = torch.cat([res["steps"][step]["before"] for res in results])  # weights before this step
        w_sub = w_step[union].clone().requires_grad_(True)
        xr = x.clone().requires_grad_(True)
        ref = reference_loss(xr, sub_labels, w_sub, "arcface", MARGINS["arcface"], 16.0, 1.5)
        ref.backward()
        lo = 0
        for rank, res in enumerate(results):
            start, stop = res["range"]
            st = res["steps"][step]
            torch.testing.assert_close(st["loss"], ref.detach(), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(st["gx"], xr.grad[lo : lo + sizes[rank]], rtol=1e-9, atol=1e-11)
            lo += sizes[rank]
            local_rows = st["sampled"] - start
            pos = torch.searchsorted(union, st["sampled"])
            torch.testing.assert_close(st["grad"][local_rows], w_sub.grad[pos], rtol=1e-9, atol=1e-11)
            untouched = torch.ones(stop - start, dtype=torch.bool)
            untouched[local_rows] = False
            assert torch.count_nonzero(st["grad"][untouched]) == 0
            # Centres not sampled: weight and momentum unchanged by the update.
            assert torch.equal(st["after"][untouched], st["before"][untouched])
            prev_mom = res["steps"][step - 1]["momentum"] if step else torch.zeros_like(st["momentum"])
            assert torch.equal(st["momentum"][untouched], prev_mom[untouched])
            # Sampled centres: SGD with momentum and weight decay on the reference gradient.
            expect_buf = 0.9 * prev_mom[local_rows] + w_sub.grad[pos] + WD * st["before"][local_rows]
            torch.testing.assert_close(st["momentum"][local_rows], expect_buf, rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(st["after"][local_rows], st["before"][local_rows] - LR * expect_buf,
                                       rtol=1e-9, atol=1e-11)
    for res in results:  # the sampled set differs across steps
        assert not torch.equal(res["steps"][0]["sampled"], res["steps"][1]["sampled"])


# ------------------------------------------------------------------ errors
def _error_worker(rank, world, case):
    head = PartialFC(make_margin("cosface", 64.0), D, C, unpg=UNPG())
    x = torch.randn(3, D)
    y = torch.tensor([0, 1, 2])
    if rank == 1:
        if case == "range":
            y = torch.tensor([0, 11, 2])
        elif case == "fraction":
            y = torch.tensor([0.0, 2.5, 1.0])
        elif case == "dtype":
            y = torch.tensor([True, False, True])
        elif case == "dim":
            x = torch.randn(3, D + 1)
        elif case == "short_batch":  # unequal batch sizes are fine
            x, y = x[:1], y[:1]
    try:
        if case == "late_range":  # bad only at the third step: found at the check point
            for step in range(3):
                y_step = torch.tensor([0, 11, 2]) if (rank == 1 and step == 2) else torch.tensor([0, 1, 2])
                head(x, y_step).backward()
            head.check_inputs()
            return ("ok", None)
        loss = head(x, y)
        loss.backward()
        return ("ok", float(loss))
    except ValueError as e:
        return ("error", str(e))


@pytest.mark.parametrize("case,needle", [("range", "11"), ("fraction", "2.5"), ("dtype", "rank 1"),
                                         ("dim", "rank 1"), ("late_range", "step 3 (")])
def test_bad_input_on_one_rank_raises_same_error_everywhere(case, needle):
    results = run_world(_error_worker, 2, case)
    assert results[0][0] == results[1][0] == "error"
    assert results[0][1] == results[1][1]
    assert needle in results[0][1]
    if case in ("range", "late_range"):
        assert "rank 1" in results[0][1] and "[11]" in results[0][1]


def test_unequal_batch_sizes_work():
    results = run_world(_error_worker, 2, "short_batch")
    assert results[0][0] == results[1][0] == "ok"
    assert results[0][1] == results[1][1]
