"""Learning-rate schedules (warmup by step) and optimizer construction."""
import math

import pytest
import torch

from trainer.config import load_config
from trainer.optim import LRScheduler, build_backbone_optimizer, lr_factor


def test_lr_factor_shapes():
    assert lr_factor(0, 100, "poly", warmup_steps=10) == pytest.approx(0.1)
    assert lr_factor(9, 100, "poly", warmup_steps=10) == pytest.approx(1.0)
    assert lr_factor(10, 100, "poly", warmup_steps=10, power=2) == pytest.approx(1.0)
    assert lr_factor(55, 100, "poly", warmup_steps=10, power=2) == pytest.approx(0.25)
    assert lr_factor(55, 100, "cosine", warmup_steps=10) == pytest.approx(0.5)
    assert lr_factor(100, 100, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(100, 100, "poly", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(30, 100, "constant", warmup_steps=10) == 1.0


def test_scheduler_drives_backbone_and_head_and_resumes():
    cfg = load_config(None, ["optim.scheduler=cosine", "optim.warmup_steps=2", "optim.lr=0.4"]).optim
    a = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    b = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = LRScheduler([a, b], [0.4, 0.2], total_steps=10, cfg=cfg)
    assert a.param_groups[0]["lr"] == pytest.approx(0.2) and b.param_groups[0]["lr"] == pytest.approx(0.1)
    for _ in range(6):
        s.step()
    want = 0.4 * 0.5 * (1 + math.cos(math.pi * 4 / 8))
    assert a.param_groups[0]["lr"] == pytest.approx(want)
    s2 = LRScheduler([a, b], [0.4, 0.2], total_steps=10, cfg=cfg)
    s2.load_state_dict(s.state_dict())
    assert s2.get_lr() == pytest.approx(want) and a.param_groups[0]["lr"] == pytest.approx(want)


def test_backbone_optimizers():
    m = torch.nn.Linear(3, 2)
    o = build_backbone_optimizer(m, load_config(None, ["optim.optimizer=adamw", "optim.weight_decay=0.05"]).optim)
    assert isinstance(o, torch.optim.AdamW) and o.param_groups[0]["weight_decay"] == 0.05
    o = build_backbone_optimizer(m, load_config(None, []).optim)
    assert isinstance(o, torch.optim.SGD) and o.param_groups[0]["momentum"] == 0.9
