"""A checkpoint written before the checkpointer took its states at construction (main at
debc522, ``fixtures/old_run``, made by ``fixtures/make_old_run.py``) resumes: same world
size, the run goes on exactly as the old code's own run did; another world size, re-sharded."""
import json
import shutil
from pathlib import Path

import torch

from tests.distributed import run_world
from tests.trainer.fixtures.make_old_run import DATA, OVERRIDES
from tests.trainer.workers import phases_worker
from trainer import checkpoint as ck

OLD = Path(__file__).parent / "fixtures" / "old_run"


def _resume(tmp_path: Path, world: int):
    out = tmp_path / f"w{world}"
    shutil.copytree(OLD / "checkpoints" / "step_00000004", out / "checkpoints" / "step_00000004")
    overrides = [o for o in OVERRIDES if not o.startswith("data.batch_size")]
    res = run_world(phases_worker, world, str(tmp_path), [
        {"out": out.name, "overrides": overrides + [f"data.batch_size={16 // world}"]}], DATA)
    return out, [r[0] for r in res]


def test_checkpoint_of_the_previous_format_resumes_exactly(tmp_path):
    old = json.loads((OLD / "summary.json").read_text())["history"]
    out, res = _resume(tmp_path, 2)
    assert res[0]["start_step"] == 4
    hist = res[0]["history"]
    # steps 1-4 from the old trainer.pt, unchanged (flags read back as booleans)
    assert hist[:4] == old[:4]
    # steps 5-6: the old run's losses (same world size: every state and the RNG restored)
    assert [h["step"] for h in hist] == [1, 2, 3, 4, 5, 6]
    for got, want in zip(hist[4:], old[4:]):
        assert got["loss"] == want["loss"] and got["loss_scale"] == want["loss_scale"], (got, want)
        assert abs(got["kept_fraction"] - want["kept_fraction"]) < 1e-12
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overflow_steps"] == 3  # counted from the old history (no count saved then)
    state = ck.load_file(out / "checkpoints" / "step_00000006" / "trainer.pt")
    assert state["samples"] == 6 * 16 and state["overflow_steps"] == 3 and state["step"] == 6


def test_checkpoint_of_the_previous_format_reshards_to_one_rank(tmp_path):
    old = json.loads((OLD / "summary.json").read_text())["history"]
    _, res = _resume(tmp_path, 1)
    assert res[0]["start_step"] == 4 and res[0]["class_range"] == (0, 24)
    got = [h["loss"] for h in res[0]["history"] if h["step"] > 4]
    # first resumed step: the same state (centres re-sliced, AdaFace's running statistics,
    # GradScaler), same math up to summation order (one rank sums the batch differently)
    assert abs(got[0] - old[4]["loss"]) <= 1e-4 * abs(old[4]["loss"]), (got, old[4:])
    torch.testing.assert_close(torch.tensor(got), torch.tensor([h["loss"] for h in old[4:]]), rtol=2e-2, atol=1e-2)
