"""Backbone optimizer and the learning-rate schedule (warmup by optimizer step)."""
from __future__ import annotations

import math
from typing import Dict, List

import torch
from torch import nn

from trainer.config import OptimConfig

#: optim.optimizer / optim.scheduler choices
OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("poly", "cosine", "constant")


def build_backbone_optimizer(model: nn.Module, cfg: OptimConfig, fused: bool = True) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay) or AdamW over the trainable backbone parameters.

    The fused implementation where torch has one for the device: it is faster and can
    skip a step on the device (``found_inf``, GradScaler's protocol), which the engine
    uses so that a non-finite step costs no host sync."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        cls, kw = torch.optim.SGD, dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        cls, kw = torch.optim.AdamW, dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
    if not fused:  # DeepSpeed wraps the optimizer and steps it itself
        return cls(params, **kw)
    try:
        opt = cls(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device / dtype
        return cls(params, **kw)
    if cls is torch.optim.SGD and cfg.momentum > 0:
        # Zero momentum buffers up front (same first step: buf = 0 * m + grad). A fused first
        # step that is skipped on the device would otherwise leave them uninitialised.
        for p in params:
            opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return opt


def lr_factor(step: int, total_steps: int, kind: str, warmup_steps: int = 0,
              power: float = 2.0, min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based).

    Linear warmup from ~0 over ``warmup_steps``; then ``poly``: (1 - t)^power,
    ``cosine``: 0.5 (1 + cos(pi t)), ``constant``: 1, where t runs 0 -> 1 over the
    remaining steps; never below ``min_ratio``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, max(0.0, (step - warmup_steps) / span))
    f = (1.0 - t) ** power if kind == "poly" else 0.5 * (1.0 + math.cos(math.pi * t))
    return min_ratio + (1.0 - min_ratio) * f


class LRScheduler:
    """Sets lr on the param groups of several optimizers (backbone, head) per step."""

    def __init__(self, optimizers: List, base_lrs: List[float], total_steps: int, cfg: OptimConfig):
        self.optimizers = optimizers
        self.base_lrs = base_lrs
        self.total_steps = total_steps
        self.cfg = cfg
        self.step_num = 0
        self._apply()

    def factor(self) -> float:
        c = self.cfg
        min_ratio = c.min_lr / c.lr if c.lr > 0 else 0.0
        return lr_factor(self.step_num, self.total_steps, c.scheduler, c.warmup_steps, c.power, min_ratio)

    def _apply(self) -> None:
        f = self.factor()
        for opt, base in zip(self.optimizers, self.base_lrs):
            for g in opt.param_groups:
                g["lr"] = base * f

    def step(self) -> None:
        self.step_num += 1
        self._apply()

    def get_lr(self) -> float:
        return self.base_lrs[0] * self.factor()

    def state_dict(self) -> Dict:
        return {"step_num": self.step_num, "total_steps": self.total_steps}

    def load_state_dict(self, sd: Dict) -> None:
        self.step_num = int(sd["step_num"])
        self._apply()
