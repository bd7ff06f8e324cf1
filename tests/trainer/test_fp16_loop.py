"""The training loop in fp16 (autocast + GradScaler, the CUDA default) on the CPU.

GradScaler finds its scale by overflowing: at the start (a large first scale) and then
every ``engine.growth_interval`` clean steps, when it doubles the scale. Such a step is
skipped on the device and must be counted, logged and survived; ``run.nan_policy`` is
for a non-finite *loss*; a scale that keeps overflowing is its own error.
"""
import json
from pathlib import Path

import pytest

from tests.trainer.synthetic import MemoryLoader, make_dataset
from tests.trainer.workers import tiny_config
from trainer.engine import LossScaleError, NonFiniteLossError
from trainer.loop import Trainer

DATA = dict(identities=16, per_id=8, seed=0)
FP16 = ["engine.precision=fp16", "data.batch_size=16", "model.norm=none", "logging.hist_every=0"]


def _train(out: Path, overrides, nan_at_batch=None):
    cfg = tiny_config(out, FP16 + list(overrides))
    imgs, labels = make_dataset(**DATA)

    def factory(c, d):
        return MemoryLoader(imgs, labels, c.data.batch_size, d.rank, d.world_size, c.run.seed,
                            nan_at_batch=nan_at_batch)

    with pytest.warns(UserWarning, match="fp16 on a CPU"):
        t = Trainer(cfg, factory).setup()
    return t, t.train()


def _gradscaler_rule(history, init, interval):
    """The scale GradScaler must hold after each step, from the steps' overflow flags alone:
    an overflow halves it (and resets the count of clean steps), ``interval`` clean steps in
    a row double it."""
    scale, clean, want = init, 0, []
    for h in history:
        if h.get("overflow"):
            scale, clean = scale * 0.5, 0
        else:
            clean += 1
            if clean == interval:
                scale, clean = scale * 2.0, 0
        want.append(scale)
    return want


def test_fp16_default_scale_trains_past_its_first_overflow(tmp_path):
    """Only ``engine.precision=fp16`` (GradScaler's default first scale 65536 overflows on this
    model at step 1, as on the synthetic demo): before the fix the run stopped at step 1
    under the default ``run.nan_policy=stop``."""
    t, res = _train(tmp_path / "run", ["run.max_steps=20"])
    hist = res["history"]
    assert [h["step"] for h in hist] == list(range(1, 21))
    assert hist[0].get("overflow") and not hist[-1].get("skipped")
    assert hist[-1]["loss_scale"] < 65536.0 and t.overflow_steps == sum(1 for h in hist if h.get("overflow"))


def test_fp16_loop_survives_overflows_counts_them_and_follows_gradscaler(tmp_path):
    init, interval, steps = 2.0 ** 24, 4, 60  # 2^24 overflows at the start; 4: frequent regrowth
    out = tmp_path / "run"
    t, res = _train(out, [f"run.max_steps={steps}", f"engine.init_scale={init}",
                          f"engine.growth_interval={interval}"])
    hist = res["history"]
    assert [h["step"] for h in hist] == list(range(1, steps + 1))  # the run finished
    over = [h["step"] for h in hist if h.get("overflow")]
    assert over and over[0] == 1, over  # overflowed at the start ...
    first_good = next(h["step"] for h in hist if not h.get("skipped"))
    assert any(s > first_good for s in over), over  # ... and again after the scale regrew
    assert all(h.get("skipped") for h in hist if h.get("overflow"))
    assert all(h["loss"] == h["loss"] and abs(h["loss"]) != float("inf") for h in hist)  # finite losses
    # the scale after every step follows GradScaler's rule, and it both fell and rose
    scales = [h["loss_scale"] for h in hist]
    assert scales == _gradscaler_rule(hist, init, interval)
    assert min(scales) < init and any(b > a for a, b in zip(scales, scales[1:]))
    assert t.overflow_steps == len(over)
    # training happened on the clean steps
    good = [h["loss"] for h in hist if not h.get("skipped")]
    assert sum(good[-5:]) / 5 < sum(good[:5]) / 5
    # counted and logged: summary.json and TensorBoard
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overflow_steps"] == len(over) and summary["loss_scale"] == scales[-1]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    logged = {e.step: e.value for e in ea.Scalars("train/overflow_steps")}
    assert logged[steps] == len(over)
    assert logged[20] == sum(1 for s in over if s <= 20)
    assert {e.step: e.value for e in ea.Scalars("train/loss_scale")}[steps] == scales[-1]
    assert "loss-scale overflow at step" in (out / "train.log").read_text()


@pytest.mark.parametrize("overrides, match", [
    (["engine.max_overflows=3"], r"at step 3: 3 overflows in a row \(engine.max_overflows=3\), scale 1.37439e\+11"),
    (["engine.min_scale=4e11"], r"at step 2: the scale fell to 2.74878e\+11 < engine.min_scale=4e\+11"),
])
def test_fp16_persistent_overflow_is_its_own_error_naming_step_and_scale(tmp_path, overrides, match):
    """A first scale of 2^40 overflows at every step: the run stops with LossScaleError
    (not the NaN policy's error), naming the step and the scale."""
    with pytest.raises(LossScaleError, match=match):
        _train(tmp_path / "run", ["run.max_steps=10", "engine.init_scale=1099511627776"] + overrides)


def test_fp16_nan_loss_still_meets_the_nan_policy(tmp_path):
    """fp16 does not hide a NaN loss behind the scaler: run.nan_policy=stop names the step."""
    with pytest.raises(NonFiniteLossError, match="non-finite loss or gradient at step 6") as e:
        _train(tmp_path / "run", ["run.max_steps=10", "engine.init_scale=256"], nan_at_batch=6)
    assert not isinstance(e.value, LossScaleError)
