"""Engines: how the backbone is wrapped, cast, back-propagated and stepped.

One interface (:class:`~trainer.engine.base.Engine`), two implementations:

- ``ddp``       :class:`~trainer.engine.ddp.DDPEngine` (torch DDP, autocast, GradScaler for fp16)
- ``deepspeed`` :class:`~trainer.engine.deepspeed.DeepSpeedEngine` (ZeRO 0/1/2, DeepSpeed's own casts)

The Partial FC shard never enters an engine: it has its own optimizer
(:class:`trainer.heads.PartialFCSGD`), stepped by the engine at the same
boundary as the backbone's. :meth:`Engine.train_step` is the one step path of
the trainer for both engines (micro-batches, NaN policy, clipping, stepping).

The names live in :mod:`trainer.engine.config` (the ``engine`` section and the
:data:`ENGINES` registry, no torch); the torch parts are imported on first use, so
that loading a configuration does not import torch.
"""
from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from trainer.engine.config import ENGINES, PRECISIONS, DeepSpeedConfig, EngineConfig

if TYPE_CHECKING:
    import torch

    from trainer.engine.base import Engine, LossScaleError, NonFiniteLossError, OptimizerFactory, StepOutput
    from trainer.runtime.process_group import DistInfo

_FROM_BASE = ("Engine", "LossScaleError", "NonFiniteLossError", "OptimizerFactory", "StepOutput")


def __getattr__(name: str) -> Any:
    if name in _FROM_BASE:
        return getattr(importlib.import_module("trainer.engine.base"), name)
    raise AttributeError(f"module 'trainer.engine' has no attribute {name!r}")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> fp16 on CUDA, fp32 elsewhere. fp16 on a CPU runs (autocast + GradScaler
    on the CPU, what the tests use to cover the fp16 path) but is slow: a warning says so."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        warnings.warn("engine.precision=fp16 on a CPU: supported for testing, but slow; use bf16 or fp32 on CPUs",
                      stacklevel=2)
    return precision


def build_engine(cfg: EngineConfig, make_optimizer: OptimizerFactory, clip_grad_norm: float,
                 backbone: torch.nn.Module, head: torch.nn.Module, head_opt: torch.optim.Optimizer, d: DistInfo,
                 grad_accum: int, batch_size: int,
                 compile: bool = False) -> Engine:
    """The engine registered under ``cfg.name`` (:data:`ENGINES`), around ``backbone``; it builds
    the backbone optimizer with ``make_optimizer(module, fused=...)``
    (:func:`trainer.optim.optimizer_factory`) and clips the backbone gradient norm at
    ``clip_grad_norm`` (0: off)."""
    precision = resolve_precision(cfg.precision, d.device)
    module, cls_name = ENGINES[cfg.name].split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    extra = {"batch_size": batch_size} if cfg.name == "deepspeed" else {}
    return cls(cfg, make_optimizer, clip_grad_norm, backbone, head, head_opt, d, grad_accum, precision,
               compile=compile, **extra)


__all__ = [
    "ENGINES",
    "PRECISIONS",
    "DeepSpeedConfig",
    "EngineConfig",
    "Engine",
    "LossScaleError",
    "NonFiniteLossError",
    "StepOutput",
    "build_engine",
    "resolve_precision",
]
