"""Engines: how the backbone is wrapped, cast, back-propagated and stepped.

One interface (:class:`~trainer.engine.base.Engine`), two implementations:

- ``ddp``       :class:`~trainer.engine.ddp.DDPEngine` (torch DDP, autocast, GradScaler for fp16)
- ``deepspeed`` :class:`~trainer.engine.deepspeed.DeepSpeedEngine` (ZeRO 0/1/2, DeepSpeed's own casts)

The Partial FC shard never enters an engine: it has its own optimizer
(:class:`trainer.heads.PartialFCSGD`), stepped by the engine at the same
boundary as the backbone's. :meth:`Engine.train_step` is the one step path of
the trainer for both engines (micro-batches, NaN policy, clipping, stepping).
"""
from __future__ import annotations

import warnings

import torch

from trainer.config import EngineConfig, OptimConfig
from trainer.distributed import DistInfo
from trainer.engine.base import Engine, LossScaleError, NonFiniteLossError, StepOutput

ENGINES = ("ddp", "deepspeed")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> fp16 on CUDA, fp32 elsewhere. fp16 on a CPU runs (autocast + GradScaler
    on the CPU, what the tests use to cover the fp16 path) but is slow: a warning says so."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        warnings.warn("engine.precision=fp16 on a CPU: supported for testing, but slow; use bf16 or fp32 on CPUs")
    return precision


def build_engine(cfg: EngineConfig, optim: OptimConfig, backbone: torch.nn.Module, head, head_opt,
                 d: DistInfo, grad_accum: int, batch_size: int, compile: bool = False) -> Engine:
    precision = resolve_precision(cfg.precision, d.device)
    if cfg.name == "deepspeed":
        from trainer.engine.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, optim, backbone, head, head_opt, d, grad_accum, precision,
                               batch_size=batch_size, compile=compile)
    from trainer.engine.ddp import DDPEngine

    return DDPEngine(cfg, optim, backbone, head, head_opt, d, grad_accum, precision, compile=compile)


__all__ = ["ENGINES", "PRECISIONS", "Engine", "LossScaleError", "NonFiniteLossError", "StepOutput", "build_engine",
           "resolve_precision"]
