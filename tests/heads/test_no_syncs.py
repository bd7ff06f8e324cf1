"""A steady-state head step makes no host sync and no data-dependent-shape op.

One step = forward + backward + ``PartialFCSGD.step``, counted with
``tests.syncs.SyncCounter`` over several steps after 2 warm-up steps, at world
sizes 1 and 2 (gloo), UNPG off / global (sharded, replicated) / local, sample
rate 1 and < 1, every margin, float32 and bf16 class state. (Collectives are not aten ops: not counted.)
"""
import pytest
import torch

from tests.distributed import run_world
from tests.heads.reference import make_margin
from tests.heads.reference_margins import PARAMS
from tests.heads.reference_margins import make_margin as make_adaptive
from tests.syncs import SyncCounter
from trainer.heads import STATE_DTYPES, UNPG, PartialFC, PartialFCSGD

D, C, B = 8, 23, 6
WARMUP, STEPS = 2, 3
UNPGS = {"off": None, "sharded": UNPG(wisk=1.5, sharded=True), "replicated": UNPG(wisk=1.0, sharded=False),
         "local": UNPG(wisk=1.5, negatives="local")}
MARGIN_KINDS = ("arcface", "cosface", "combined", "adaface", "magface", "curricularface")
CONFIGS = [(m, u, r) for m in MARGIN_KINDS for u in UNPGS for r in (1.0, 0.4)
           if m in ("arcface", "curricularface") or (u in ("off", "sharded") and r == 0.4)]
# bf16 class state (loss.state_dtype: bf16): bf16-operand GEMMs, chunked update, stochastic rounding
CONFIGS += [(m, u, r, "bf16") for m in ("arcface", "adaface") for u in ("off", "sharded") for r in (1.0, 0.4)]


def _margin(kind):
    if kind in PARAMS:
        return make_adaptive(kind, 32.0, PARAMS[kind])
    return make_margin(kind, 32.0)


def _count_steps(rank, world, configs):
    out = {}
    for kind, unpg, rate, *state in configs:
        torch.manual_seed(rank)
        head = PartialFC(_margin(kind), D, C, sample_rate=rate, unpg=UNPGS[unpg], chunk_elements=40,
                         dtype=STATE_DTYPES[state[0] if state else "fp32"])
        # small update chunks: several per step (the chunk loop is what is counted)
        opt = PartialFCSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4, chunk_elements=3 * D)
        counter = SyncCounter()
        for step in range(WARMUP + STEPS):
            x = torch.randn(B + rank, D, requires_grad=True)  # uneven batches
            y = torch.randint(0, C, (B + rank,))
            if step == WARMUP + 1:
                y[:] = 3  # a one-label local batch (no local negative pair)
            if step == WARMUP:
                counter.__enter__()
            opt.zero_grad(set_to_none=True)
            loss = head(x, y)
            loss.backward()
            opt.step()
        counter.__exit__(None, None, None)
        assert head.last_stats["loss"].dim() == 0
        head.check_inputs()  # the check point: one sync, outside the counted steps
        out[(kind, unpg, rate, *state)] = (dict(counter.counts), counter.report())
    return out


def _check(results):
    for res in results:
        bad = {cfg: rep for cfg, (counts, rep) in res.items() if counts}
        assert not bad, "\n".join(f"{cfg}: {rep}" for cfg, rep in bad.items())


@pytest.mark.parametrize("world", [1, 2])
def test_steady_state_head_step_has_no_host_sync(world):
    if world == 1:
        _check([_count_steps(0, 1, CONFIGS)])
    else:
        _check(run_world(_count_steps, 2, CONFIGS))


def test_counter_counts_item_and_boolean_mask():
    x = torch.randn(5)
    with SyncCounter() as counter:
        _ = x * 2
    assert counter.total == 0, counter.report()
    with SyncCounter() as counter:
        float(x.sum())
        x[x > 0]
    assert counter.counts["_local_scalar_dense (item/float/int/bool/tolist of a tensor)"] == 1
    assert any("boolean" in k or k == "nonzero" for k in counter.counts), counter.report()
    assert "test_no_syncs.py" in counter.report()
    with SyncCounter() as counter:
        torch.unique(x)
        torch.sparse_coo_tensor(torch.tensor([[0, 0]]), torch.ones(2), (3,)).coalesce()
    assert counter.total == 2, counter.report()
