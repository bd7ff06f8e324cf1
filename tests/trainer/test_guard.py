"""StepGuard: the skipped-step bookkeeping in one place (loop-level runs: test_fp16_loop.py,
test_train.py::test_nan_loss_stops_naming_the_step_or_skips)."""
import pytest
import torch

from trainer.engine import LossScaleError, NonFiniteLossError, StepOutput
from trainer.guard import StepGuard
from trainer.state import TrainState


def _out(loss, skipped=False, overflow=None, scale=None):
    t = torch.tensor
    return StepOutput(loss=t(loss), skipped=t(skipped), overflow=None if overflow is None else t(overflow),
                      loss_scale=None if scale is None else t(scale))


def _guard(**kw):
    args = dict(nan_policy="stop", max_skips=1, min_scale=1.0, max_overflows=3) | kw
    state, history = TrainState(), []
    return StepGuard(state, history, **args), state, history


def test_overflows_are_counted_never_stop_alone_and_reset_on_a_good_step():
    g, state, hist = _guard()
    for step, ov in enumerate([True, True, False, True, True, False], 1):  # never 3 in a row
        g.push(step, _out(2.0, skipped=ov, overflow=ov, scale=2.0 ** (10 - step)), {"kept_fraction": torch.tensor(0.5)})
    assert g.pending == 6
    g.flush()
    assert g.pending == 0 and state.overflow_steps == 4 and state.skipped_steps == 0
    assert [h.get("overflow", False) for h in hist] == [True, True, False, True, True, False]
    assert hist[0] == {"step": 1, "loss": 2.0, "kept_fraction": 0.5, "loss_scale": 512.0, "skipped": True,
                       "overflow": True}


def test_overflow_limits_raise_naming_the_step():
    g, _, hist = _guard(max_overflows=2)
    for step in (1, 2):
        g.push(step, _out(2.0, True, True, 8.0), {})
    with pytest.raises(LossScaleError, match="at step 2: 2 overflows in a row"):
        g.flush()
    assert [h["step"] for h in hist] == [1]  # the step that stops the run is not recorded
    g, _, _ = _guard(min_scale=4.0)
    g.push(1, _out(2.0, True, True, 2.0), {})
    with pytest.raises(LossScaleError, match=r"at step 1: the scale fell to 2 < engine.min_scale=4"):
        g.flush()


def test_nan_policy_stop_and_skip():
    g, state, _ = _guard()
    g.push(1, _out(1.0), {})
    g.push(2, _out(float("nan"), True), {"kept_fraction": torch.tensor(float("nan"))})
    with pytest.raises(NonFiniteLossError, match=r"at step 2 .*run.nan_policy=stop"):
        g.flush()
    g, state, hist = _guard(nan_policy="skip", max_skips=1)
    g.push(1, _out(float("nan"), True), {"kept_fraction": torch.tensor(float("nan"))})
    g.push(2, _out(1.0), {})
    g.push(3, _out(float("inf"), True), {})
    g.flush()
    assert state.skipped_steps == 2 and [h.get("skipped", False) for h in hist] == [True, False, True]
    assert "kept_fraction" not in hist[0]  # NaN: no value that step
    g.push(4, _out(float("nan"), True), {})
    with pytest.raises(NonFiniteLossError, match=r"at step 4: 2 steps skipped in a row \(run.max_skips=1\)"):
        g.flush()
