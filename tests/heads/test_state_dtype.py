"""Half-width classifier state (``loss.state_dtype: bf16``): rounding, head, optimizer, state dicts.

- stochastic rounding is unbiased: the mean of many roundings, and of many
  tiny updates far below one ulp through ``PartialFCSGD.step`` (sparse and
  dense), equals the float32 result within 4 standard errors; round-to-nearest
  (computed alongside) fails the same check;
- the bf16-state head's loss and gradients equal the dense float64 reference
  (written from the definitions, weights rounded to bf16) within bf16
  tolerance at 1, 2 and 3 ranks (C not divisible), every margin, UNPG
  global/local/sharded, sampling; the float32 head on the same weights matches
  tightly (the same run);
- a sampled bf16 step: touched rows within one bf16 ulp of the float32 SGD
  formula, untouched rows and their momentum bit for bit unchanged;
- state dicts convert between widths (bf16 -> fp32 exactly).
"""
import math

import pytest
import torch

from tests.distributed import run_world
from tests.heads.reference import MARGINS, make_margin, rank_step, reference_loss
from tests.heads.reference_margins import PARAMS
from tests.heads.reference_margins import make_margin as make_adaptive
from trainer.heads import UNPG, PartialFC, PartialFCSGD
from trainer.heads.sparse_sgd import STATE_DTYPES, stochastic_round_bf16

U = 2.0 ** -8  # bfloat16 unit roundoff (8 significant bits)


def _within_standard_error(samples: torch.Tensor, target: torch.Tensor, k: float = 4.0) -> bool:
    """Mean of ``samples`` (float64, dim 0 = draws) equals ``target`` within k standard errors."""
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])
    return bool(((mean - target).abs() <= k * se + 1e-300).all())


def test_stochastic_rounding_is_unbiased_and_rounding_to_nearest_is_not():
    g = torch.Generator().manual_seed(0)
    # values at several positions inside their bf16 interval, several binades, both signs
    x = (torch.tensor([1.0, -3.0, 0.01, 1234.5, -7e-5]).unsqueeze(1)
         * (1 + torch.tensor([0.1, 0.25, 0.5, 0.77, 0.9]) * U)).reshape(-1).float()
    draws = 20000
    noise = torch.randint(0, 1 << 16, (draws, x.numel()), dtype=torch.int32, generator=g)
    sr = stochastic_round_bf16(x.expand(draws, -1), noise)
    lo = x.bfloat16()  # every draw is one of the two neighbours of x
    assert ((sr.double() - x.double()).abs() < 2 * U * x.double().abs()).all()
    assert sr.unique(dim=0).shape[0] > 1
    assert _within_standard_error(sr.double(), x.double())
    rtn = lo.expand(draws, -1).double()
    assert not _within_standard_error(rtn + 1e-30 * torch.randn(rtn.shape, dtype=torch.float64, generator=g),
                                      x.double())
    # NaN stays NaN; exact bf16 values are never moved
    assert torch.isnan(stochastic_round_bf16(torch.tensor([float("nan")]))).all()
    exact = torch.tensor([1.0, -2.5, 0.0]).bfloat16().float()
    assert torch.equal(stochastic_round_bf16(exact.expand(100, -1)).float(), exact.expand(100, -1))


@pytest.mark.parametrize("sparse", [True, False])
def test_tiny_updates_are_kept_on_average(sparse):
    """K updates of lr * g = 1e-4 each on w = 1.0 (half an ulp of bf16 at 1.0 is 2^-9 = 2e-3):
    the float32 result 1 - K * 1e-4 is reached on average over the elements (within 4 standard
    errors); round-to-nearest keeps 1.0 forever and fails the same check."""
    torch.manual_seed(0)
    rows, dim, steps, lr, delta = 64, 64, 50, 1.0, 1e-4
    p = torch.nn.Parameter(torch.ones(rows, dim, dtype=torch.bfloat16))
    opt = PartialFCSGD([p], lr=lr, momentum=0.0, weight_decay=0.0, chunk_elements=7 * dim)
    used = torch.arange(0, rows, 2)  # sparse: every other row; the rest must never move
    for _ in range(steps):
        g = torch.full((used.numel(), dim), delta, dtype=torch.bfloat16)
        if sparse:
            p.grad = torch.sparse_coo_tensor(used.unsqueeze(0), g, p.shape)
        else:
            p.grad = torch.full((rows, dim), delta, dtype=torch.bfloat16)
        opt.step()
    g32 = torch.tensor(delta, dtype=torch.bfloat16).double()  # the gradient as stored
    target = torch.tensor(1.0 - steps * lr * float(g32), dtype=torch.float64)
    touched = p.detach()[used] if sparse else p.detach()
    assert _within_standard_error(touched.double().reshape(-1, 1), target)
    if sparse:
        untouched = torch.ones(rows, dtype=torch.bool)
        untouched[used] = False
        assert torch.equal(p.detach()[untouched], torch.ones(rows // 2, dim, dtype=torch.bfloat16))
    # round to nearest: the same updates vanish
    w = torch.ones(used.numel() * dim, dtype=torch.bfloat16)
    for _ in range(steps):
        w = (w.float() - lr * float(g32)).bfloat16()
    assert torch.equal(w, torch.ones_like(w))
    assert not _within_standard_error(w.double().reshape(-1, 1) + 1e-12 * torch.randn(w.numel(), 1).double(),
                                      target)


def test_sgd_with_momentum_in_bf16_tracks_float32_on_average():
    """Momentum + weight decay, 30 steps of one random gradient sequence on 4096 copies of one
    row: the bf16 state's mean trajectory equals the float32 one within 4 standard errors."""
    torch.manual_seed(1)
    copies, dim, steps = 4096, 4, 30
    w0 = torch.randn(1, dim).bfloat16().float()
    grads = (torch.randn(steps, 1, dim) * 1e-3).bfloat16()
    ref = torch.nn.Parameter(w0.clone().double())
    ref_opt = torch.optim.SGD([ref], lr=0.05, momentum=0.9, weight_decay=5e-4)
    p = torch.nn.Parameter(w0.expand(copies, dim).bfloat16().clone())
    opt = PartialFCSGD([p], lr=0.05, momentum=0.9, weight_decay=5e-4)
    for t in range(steps):
        ref.grad = grads[t].double()
        ref_opt.step()
        p.grad = torch.sparse_coo_tensor(torch.arange(copies).unsqueeze(0), grads[t].expand(copies, dim), p.shape)
        opt.step()
    assert _within_standard_error(p.detach().double(), ref.detach()[0])
    assert p.dtype == torch.bfloat16 and opt.state[p]["momentum_buffer"].dtype == torch.bfloat16


# ------------------------------------------------------------------ head vs reference
D, C = 6, 11
BATCHES = {1: [9], 2: [5, 4], 3: [5, 2, 4]}
CASES = [  # (margin, s, wisk, negatives, sharded)
    ("arcface", 32.0, 1.5, "global", None),
    ("cosface", 64.0, None, "global", None),
    ("combined", 16.0, 1.0, "local", None),
    ("arcface", 16.0, 1.5, "global", False),
]


def _global_data(n_rows, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (n_rows,), generator=g)
    labels[:3] = torch.tensor([2, 2, 10])
    w = torch.randn(C, D, generator=g, dtype=torch.float64).bfloat16().double()  # representable in bf16
    return x.float().double(), labels, w


def _head_worker(rank, world, sizes):
    x, labels, w = _global_data(sum(sizes))
    out = []
    for kind, s, wisk, negatives, sharded in CASES:
        per_dtype = {}
        for name, dtype in STATE_DTYPES.items():
            unpg = None if wisk is None else UNPG(wisk=wisk, negatives=negatives, sharded=sharded)
            head = PartialFC(make_margin(kind, s), D, C, unpg=unpg, dtype=dtype)
            assert head.weight.dtype == dtype and head.state_bytes_per_class == 2 * D * (4 if name == "fp32" else 2)
            loss, local_x = rank_step(head, x.float(), labels, w.float(), sizes, rank)
            assert loss.dtype == torch.float32 and local_x.grad.dtype == torch.float32
            assert head.weight.grad.dtype == dtype
            per_dtype[name] = (loss.detach(), local_x.grad, head.weight.grad.float())
        out.append((per_dtype, head.class_range))
    return out


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_bf16_head_matches_dense_reference(world):
    sizes = BATCHES[world]
    results = run_world(_head_worker, world, sizes)
    x, labels, w = _global_data(sum(sizes))
    for i, (kind, s, wisk, negatives, _) in enumerate(CASES):
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        ref = reference_loss(xr, labels, wr, kind, MARGINS[kind], s, wisk,
                             groups=sizes if negatives == "local" else None)
        ref.backward()
        lo = 0
        for rank in range(world):
            per_dtype, (start, stop) = results[rank][i]
            loss32, gx32, gw32 = per_dtype["fp32"]
            torch.testing.assert_close(loss32.double(), ref.detach(), rtol=1e-5, atol=1e-5)
            assert _rel(gx32, xr.grad[lo:lo + sizes[rank]]) < 1e-4
            loss16, gx16, gw16 = per_dtype["bf16"]
            # bf16 tolerance: GEMM operands and the stored centre gradient carry 2^-8 relative error
            assert abs(float(loss16) - float(ref)) <= U * abs(float(ref)), (kind, float(loss16), float(ref))
            assert _rel(gx16, xr.grad[lo:lo + sizes[rank]]) < 4 * U, kind
            assert _rel(gw16, wr.grad[start:stop]) < 4 * U, kind
            lo += sizes[rank]


@pytest.mark.parametrize("kind", ["adaface", "magface", "curricularface"])
def test_bf16_head_matches_float32_head_adaptive_margins(kind):
    torch.manual_seed(2)
    n, c = 24, 40
    x = torch.randn(n, D) * 8
    y = torch.randint(0, c, (n,))
    w = torch.randn(c, D).bfloat16()
    got = {}
    for name, dtype in STATE_DTYPES.items():
        head = PartialFC(make_adaptive(kind, 32.0, PARAMS[kind]), D, c, unpg=UNPG(wisk=1.5), dtype=dtype)
        with torch.no_grad():
            head.weight.copy_(w)
        xx = x.clone().requires_grad_(True)
        losses = []
        for _ in range(2):  # the running statistics move in float32 in both
            loss = head(xx, y)
            losses.append(loss.detach())
        loss.backward()
        assert all(b.dtype == torch.float32 for b in head.margin.buffers())
        got[name] = (torch.stack(losses), xx.grad, head.weight.grad.float())
    assert (got["bf16"][0] - got["fp32"][0]).abs().max() <= U * got["fp32"][0].abs().max()
    assert _rel(got["bf16"][1], got["fp32"][1]) < 4 * U
    assert _rel(got["bf16"][2], got["fp32"][2]) < 4 * U


# ------------------------------------------------------------------ sampled optimizer step
CS, RATE, LR, WD = 90, 0.3, 0.1, 5e-4


def _sampling_worker(rank, world, sizes):
    torch.manual_seed(100 + rank)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(sum(sizes), D, generator=g)
    labels = torch.randint(0, CS, (sum(sizes),), generator=g)
    lo = sum(sizes[:rank])
    head = PartialFC(make_margin("arcface", 16.0), D, CS, sample_rate=RATE, unpg=UNPG(wisk=1.5),
                     dtype=torch.bfloat16)
    opt = PartialFCSGD(head, lr=LR, momentum=0.9, weight_decay=WD, chunk_elements=5 * D)
    buf = opt.state[head.weight]["momentum_buffer"]
    with torch.no_grad():
        buf.copy_(torch.randn(buf.shape, generator=g) * 0.01)
    steps = []
    for _ in range(2):
        local_x = x[lo:lo + sizes[rank]].clone().requires_grad_(True)
        before, mom_before = head.weight.detach().clone(), buf.clone()
        opt.zero_grad()
        head(local_x, labels[lo:lo + sizes[rank]]).backward()
        grad = head.weight.grad.to_dense().float()
        opt.step()
        steps.append(dict(sampled=head.sampled_classes - head.class_range[0], grad=grad, before=before,
                          mom_before=mom_before, after=head.weight.detach().clone(), mom=buf.clone()))
    return steps


def _ulp(v):
    """One bf16 ulp at |v| (2^(e - 7) for |v| in [2^e, 2^(e+1)))."""
    return torch.exp2(torch.floor(torch.log2(v.abs().clamp_min(1e-30))) - 7)


@pytest.mark.parametrize("world", [1, 3])
def test_sampled_bf16_step_touches_only_sampled_rows_within_one_ulp(world):
    for steps in run_world(_sampling_worker, world, BATCHES[world]):
        for st in steps:
            rows = st["sampled"]
            untouched = torch.ones(st["before"].shape[0], dtype=torch.bool)
            untouched[rows] = False
            assert torch.equal(st["after"][untouched], st["before"][untouched])
            assert torch.equal(st["mom"][untouched], st["mom_before"][untouched])
            w, m, g = st["before"][rows].float(), st["mom_before"][rows].float(), st["grad"][rows]
            expect_m = 0.9 * m + g + WD * w
            expect_w = w - LR * expect_m
            assert ((st["mom"][rows].float() - expect_m).abs() <= _ulp(expect_m)).all()
            assert ((st["after"][rows].float() - expect_w).abs() <= _ulp(expect_w)).all()
            assert not torch.equal(st["after"][rows], st["before"][rows])


# ------------------------------------------------------------------ state dicts
def test_state_dicts_convert_between_widths():
    torch.manual_seed(3)
    heads = {n: PartialFC(make_margin("arcface", 16.0), D, C, dtype=d) for n, d in STATE_DTYPES.items()}
    opts = {n: PartialFCSGD(h, lr=0.1) for n, h in heads.items()}
    for h, o in zip(heads.values(), opts.values()):
        o.state[h.weight]["momentum_buffer"].normal_()
    # bf16 -> fp32: exact widening
    heads["fp32"].load_state_dict(heads["bf16"].state_dict())
    opts["fp32"].load_state_dict(opts["bf16"].state_dict())
    assert heads["fp32"].weight.dtype == torch.float32
    assert torch.equal(heads["fp32"].weight.detach(), heads["bf16"].weight.detach().float())
    buf32 = opts["fp32"].state[heads["fp32"].weight]["momentum_buffer"]
    assert buf32.dtype == torch.float32
    assert torch.equal(buf32, opts["bf16"].state[heads["bf16"].weight]["momentum_buffer"].float())
    # fp32 -> bf16: rounded to nearest, stored in bf16
    w32 = torch.randn(C, D)
    with torch.no_grad():
        heads["fp32"].weight.copy_(w32)
    heads["bf16"].load_state_dict(heads["fp32"].state_dict())
    opts["bf16"].load_state_dict(opts["fp32"].state_dict())
    assert heads["bf16"].weight.dtype == torch.bfloat16
    assert torch.equal(heads["bf16"].weight.detach(), w32.bfloat16())
    assert opts["bf16"].state[heads["bf16"].weight]["momentum_buffer"].dtype == torch.bfloat16


def test_float16_state_is_refused():
    with pytest.raises(TypeError, match="float32, float64 or bfloat16"):
        PartialFC(make_margin("arcface", 16.0), D, C, dtype=torch.float16)
    with pytest.raises(TypeError, match="bfloat16"):
        PartialFCSGD([torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float16))])


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_bf16_state_with_fp16_grad_scaler_skips_on_inf_and_steps_otherwise(rate):
    """The CUDA default (fp16 + GradScaler) unscales the bf16 head gradient (dense or sparse) and
    sets ``found_inf``: an overflowing step leaves weights and momentum bit for bit, a finite one moves them."""
    torch.manual_seed(4)
    head = PartialFC(make_margin("arcface", 16.0), D, 40, sample_rate=rate, dtype=torch.bfloat16)
    opt = PartialFCSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    buf = opt.state[head.weight]["momentum_buffer"]
    x, y = torch.randn(12, D), torch.randint(0, 40, (12,))
    for scale, expect_skip in ((float("inf"), True), (1024.0, False)):
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        w0, m0 = head.weight.detach().clone(), buf.clone()
        opt.zero_grad(set_to_none=True)
        scaler.scale(head(x, y)).backward()
        assert head.weight.grad.dtype == torch.bfloat16 and head.weight.grad.is_sparse == (rate < 1)
        scaler.unscale_(opt)
        found = sum(v for v in scaler._found_inf_per_device(opt).values())
        opt.found_inf = found  # what the engine does (trainer/engine/ddp.py)
        opt.step()
        opt.found_inf = None
        moved = not torch.equal(head.weight.detach(), w0)
        assert moved != expect_skip
        if expect_skip:
            assert torch.equal(buf, m0)
        assert torch.isfinite(head.weight.detach().float()).all()
