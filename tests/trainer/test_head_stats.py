"""The head's statistics reach the logs through the Head protocol only: the monitor writes
whatever names the head gives (no head-specific names in it), and an adaptive margin's
running state (AdaFace's batch mean/std, CurricularFace's t) is logged per step."""
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.trainer.synthetic import MemoryLoader, make_dataset
from tests.trainer.workers import tiny_config
from trainer.heads import UNPG, AdaFace, ArcFace, CurricularFace, Head, PartialFC
from trainer.loop import Trainer
from trainer.monitor import Monitor
from trainer.section import LoggingConfig

DATA = dict(identities=16, per_id=8, seed=0)


def _train(out: Path, overrides):
    cfg = tiny_config(out, ["data.batch_size=16", "run.max_steps=6"] + list(overrides))
    imgs, labels = make_dataset(**DATA)
    t = Trainer(cfg, lambda c, d: MemoryLoader(imgs, labels, c.data.batch_size, d.rank, d.world_size, c.run.seed))
    t.setup()
    return t, t.train()


def _scalars(out: Path):
    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    return {tag: {e.step: e.value for e in ea.Scalars(tag)} for tag in ea.Tags()["scalars"]}


@pytest.mark.parametrize("margin, names", [
    ("adaface", ["margin/batch_mean", "margin/batch_std"]),
    ("curricularface", ["margin/t"]),
])
def test_adaptive_margin_state_is_logged_each_step(tmp_path, margin, names):
    out = tmp_path / "run"
    t, res = _train(out, [f"loss.margin={margin}"])
    hist = res["history"]
    scalars = _scalars(out)
    for name in names:
        per_step = [h[name] for h in hist]
        assert len(per_step) == 6 and len(set(per_step)) == 6, per_step  # a running value, moved every step
        buf = getattr(t.head.margin, name.split("/")[1])
        assert per_step[-1] == pytest.approx(float(buf), rel=1e-6)  # the state after the last step
        # TensorBoard at the logging steps (logging.log_every=5 and the last step)
        assert scalars[name] == pytest.approx({5: per_step[4], 6: per_step[5]}, rel=1e-6)
    assert not any(k.startswith("unpg/") for k in scalars)  # no UNPG: no UNPG names
    if margin == "adaface":  # the first update from the initial values (20, 100) with t_alpha = 0.01
        assert 0.99 * 20 < hist[0]["margin/batch_mean"] != 20


def test_unpg_statistics_keep_their_names(tmp_path):
    out = tmp_path / "run"
    _, res = _train(out, ["loss.unpg=true"])
    scalars = _scalars(out)
    assert {"unpg/kept", "unpg/neg_pairs", "unpg/kept_fraction", "head/loss"} <= set(scalars)
    assert all(0 < h["kept_fraction"] <= 1 for h in res["history"])
    assert scalars["unpg/kept_fraction"][5] == pytest.approx(res["history"][4]["kept_fraction"])
    assert not any(k.startswith("margin/") for k in scalars)  # ArcFace: no running state


def test_monitor_writes_the_names_it_is_given(tmp_path):
    mon = Monitor(tmp_path, True, 10, 0, 8, LoggingConfig(log_every=1, hist_every=1, progress_bar=False,
                                                             image_grid=False))
    stats = {"anyhead/some_scalar": torch.tensor(1.5), "anyhead/sample": torch.tensor([0.1, float("nan"), 0.3])}
    mon.record(1, 0, 0.1, 2.0, None, lambda: None, lambda: stats, None)
    mon.close()
    ea = EventAccumulator(str(tmp_path / "tensorboard"))
    ea.Reload()
    assert ea.Scalars("anyhead/some_scalar")[0].value == 1.5
    assert "anyhead/sample" in ea.Tags()["histograms"]


@pytest.mark.parametrize("margin", [ArcFace(s=16.0, m=0.3), AdaFace(s=16.0), CurricularFace(s=16.0)])
def test_partial_fc_is_a_head(margin):
    head = PartialFC(margin, 8, 6, unpg=UNPG())
    assert isinstance(head, Head)
    loss = head(torch.randn(5, 8), torch.tensor([0, 1, 2, 2, 5]))
    stats, step = head.stats(), head.step_stats()
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in stats.values())
    assert stats["head/loss"] == loss.detach() and "kept_fraction" in step
    assert set(step) == {"kept_fraction"} | {f"margin/{k}" for k in margin.stats()}
