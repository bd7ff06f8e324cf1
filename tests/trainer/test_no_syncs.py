"""The steady-state training step (DDP engine, 2 gloo ranks) makes no host sync and no
data-dependent-shape op: engine, head, optimizers and the loop's bookkeeping together.
(The head alone: tests/heads/test_no_syncs.py.)"""
import pytest

from tests.distributed import run_world
from tests.trainer.workers import sync_count_worker

DATA = dict(identities=24, per_id=8, seed=0)
COMMON = ["run.max_steps=7", "data.batch_size=8", "checkpoint.save_every=0"]


@pytest.mark.parametrize("extra", [
    ["loss.unpg=true", "loss.sample_rate=1.0"],
    ["loss.unpg=true", "loss.sample_rate=0.5", "optim.grad_accum=2"],
    ["loss.unpg=false", "engine.precision=bf16", "optim.clip_grad_norm=0"],
    # fp16: GradScaler, its overflow flag and scale are kept as device tensors until a logging step
    ["loss.unpg=true", "engine.precision=fp16", "model.norm=none", "engine.init_scale=16777216",
     "engine.growth_interval=2"],
], ids=["unpg-global", "unpg-sampled-accum", "plain-bf16", "unpg-fp16-overflows"])
def test_training_steps_make_no_host_sync(tmp_path, extra):
    res = run_world(sync_count_worker, 2, str(tmp_path / "run"), COMMON + extra, DATA)
    for rank, r in enumerate(res):
        assert r["total"] == 0, f"rank {rank}:\n{r['report']}"
