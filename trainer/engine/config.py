"""The ``engine`` configuration section and the engines' registry of names (no torch here).

:data:`ENGINES` maps each ``engine.name`` to the class that implements it
(``module:Class``, imported when the engine is built), so that the configuration
knows the names without importing the engines.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict

from trainer.section import at_least_one, need, one_of

#: engine.name -> the implementing class, imported by trainer.engine.build_engine
ENGINES: Dict[str, str] = {
    "ddp": "trainer.engine.ddp:DDPEngine",
    "deepspeed": "trainer.engine.deepspeed:DeepSpeedEngine",
}
#: engine.precision choices
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: engine.deepspeed.zero_stage choices
ZERO_STAGES = (0, 1, 2)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1                # ZeRO stage 0/1/2
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000

    def __post_init__(self) -> None:
        one_of("engine.deepspeed.zero_stage", self.zero_stage, ZERO_STAGES)
        at_least_one("engine.deepspeed.", self, ("reduce_bucket_size", "allgather_bucket_size"))


@dataclass
class EngineConfig:
    name: str = "ddp"                  # ddp | deepspeed (trainer.engine)
    precision: str = "auto"            # auto | fp32 | bf16 | fp16 (auto: fp16 on CUDA, fp32 on CPU)
    # fp16 loss scaling (GradScaler / DeepSpeed's dynamic scaler; docs/training.md, fp16): the first
    # scale and the overflow-free steps before it doubles; an overflow halves it and skips the step.
    # The run stops when the scale falls below min_scale or after max_overflows overflows in a row.
    init_scale: float = 65536.0
    growth_interval: int = 2000
    min_scale: float = 1.0
    max_overflows: int = 20
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def __post_init__(self) -> None:
        one_of("engine.name", self.name, ENGINES)
        one_of("engine.precision", self.precision, PRECISIONS)
        need("engine.growth_interval", self.growth_interval, self.growth_interval >= 1, ">= 1")
        need("engine.max_overflows", self.max_overflows, self.max_overflows >= 1, ">= 1")
        for key, val in {"engine.init_scale": self.init_scale, "engine.min_scale": self.min_scale}.items():
            need(key, val, math.isfinite(val) and val > 0, "a finite number > 0")
        need("engine.init_scale", self.init_scale, self.init_scale >= self.min_scale,
             f">= engine.min_scale ({self.min_scale})")
