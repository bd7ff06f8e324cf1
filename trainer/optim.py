"""Backbone optimizer and the learning-rate schedule (warmup by optimizer step), and
their configuration section ``optim`` (:class:`OptimConfig`).

torch is imported where an optimizer is built, so that the section loads without it.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from trainer.section import ConfigError, finite, need, non_negative_count, one_of

if TYPE_CHECKING:
    import torch
    from torch import nn

#: optim.optimizer / optim.scheduler choices
OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("poly", "cosine", "constant")

#: the largest learning rate accepted (optim.lr, optim.head_lr)
MAX_LR = 10.0


@dataclass
class OptimConfig:
    optimizer: str = "sgd"             # sgd | adamw (backbone); the head uses PartialFCSGD
    lr: float = 0.1
    head_lr: Optional[float] = None    # default: lr
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    scheduler: str = "poly"            # poly | cosine | constant
    power: float = 2.0                 # polynomial decay power (arcface_torch uses 2)
    warmup_steps: int = 0              # linear warmup, in optimizer steps
    min_lr: float = 0.0
    grad_accum: int = 1                # micro-batches per optimizer step
    clip_grad_norm: float = 5.0        # backbone only; 0 disables
    backbone_lr_scale: float = 1.0     # backbone lr = lr x scale (the head keeps head_lr); fine-tuning
    freeze_backbone_steps: int = 0     # the first N optimizer steps train the head only (BN untouched)

    def __post_init__(self) -> None:
        one_of("optim.optimizer", self.optimizer, OPTIMIZERS)
        one_of("optim.scheduler", self.scheduler, SCHEDULERS)
        need("optim.grad_accum", self.grad_accum, self.grad_accum >= 1, ">= 1")
        non_negative_count("optim.", self, ("warmup_steps", "freeze_backbone_steps"))
        floats = ("lr", "head_lr", "momentum", "weight_decay", "power", "min_lr", "clip_grad_norm",
                  "backbone_lr_scale")
        for n in floats:
            need("optim." + n, getattr(self, n), finite(getattr(self, n)), "a finite number")
        for n in ("weight_decay", "min_lr", "clip_grad_norm", "power", "backbone_lr_scale"):
            need("optim." + n, getattr(self, n), getattr(self, n) >= 0, ">= 0")
        need("optim.momentum", self.momentum, 0 <= self.momentum < 1, "in [0, 1)")
        need("optim.lr", self.lr, self.lr > 0, "> 0")
        for n in ("lr", "head_lr"):
            v = getattr(self, n)
            need("optim." + n, v, v is None or v <= MAX_LR, f"<= {MAX_LR:g} (a learning rate above that diverges "
                 "at once; face recognition recipes use 0.02-0.4)")
        need("optim.head_lr", self.head_lr, self.head_lr is None or self.head_lr > 0, "> 0")
        need("optim.min_lr", self.min_lr, self.min_lr <= self.lr, f"<= optim.lr ({self.lr})")
        if len(self.betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in self.betas):
            raise ConfigError(f"config key 'optim.betas' must be two numbers in [0, 1) (Adam's beta1, beta2), "
                              f"got {self.betas!r}")


def build_backbone_optimizer(model: nn.Module, cfg: OptimConfig, fused: bool = True) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay) or AdamW over the trainable backbone parameters.

    The fused implementation where torch has one for the device: it is faster and can
    skip a step on the device (``found_inf``, GradScaler's protocol), which the engine
    uses so that a non-finite step costs no host sync."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    kw: Dict[str, Any]
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


def optimizer_factory(cfg: OptimConfig) -> Callable[..., torch.optim.Optimizer]:
    """What an engine receives: ``make(module, fused=True)`` builds the backbone optimizer
    of ``cfg`` (:func:`build_backbone_optimizer`); the engine never sees the section."""
    return functools.partial(build_backbone_optimizer, cfg=cfg)


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
