"""The ``model`` configuration section and the backbones' names (no torch here).

:data:`BACKBONES` lists the names :mod:`trainer.backbones.registry` registers (it
refuses a name missing here; a test checks the two agree), so that a configuration
checks ``model.backbone`` without importing torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from trainer.section import ConfigError, at_least_one, need, one_of

#: model.backbone: every registered name (insightface's and our aliases)
BACKBONES = ("iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200", "mbf", "mbf_large",
             "mobilefacenet", "r18", "r34", "r50", "r100", "r200", "tiny")
#: model.bn_mode choices (trainer.batchnorm)
BN_MODES = ("train", "frozen", "recalibrate")


@dataclass
class ModelConfig:
    backbone: str = "r50"              # a name of trainer.backbones.available_backbones()
    embedding_size: int = 512
    dropout: float = 0.0               # before the embedding layer (iresnet, tiny)
    width: Optional[int] = None        # channel width where the backbone has one (tiny); None: its default
    norm: Optional[str] = None         # tiny: "batch" | "none"; None: the backbone's default
    grad_checkpointing: bool = False   # recompute iresnet stages in backward (memory for time)
    compile: bool = False              # torch.compile the backbone
    # fine-tuning (docs/finetune.md): backbone weights at step 0 (never on resume: a checkpoint wins)
    init_from: str = ""                # state dict (insightface keys) / export file / run folder; "": random
    init_strict: bool = True           # False: differing layers (e.g. embedding_size) start fresh, listed
    bn_mode: str = "train"             # train | frozen (running stats fixed) | recalibrate (re-estimated first)
    bn_recalibrate_batches: int = 50   # bn_mode=recalibrate: batches of the new data before step 1

    def __post_init__(self) -> None:
        one_of("model.bn_mode", self.bn_mode, BN_MODES)
        at_least_one("model.", self, ("embedding_size", "width", "bn_recalibrate_batches"))
        need("model.dropout", self.dropout, math.isfinite(self.dropout), "a finite number")
        need("model.dropout", self.dropout, 0 <= self.dropout < 1, "in [0, 1)")
        if self.backbone.lower() not in BACKBONES:
            raise ConfigError(f"config key 'model.backbone': unknown {self.backbone!r}; "
                              f"valid: {', '.join(sorted(BACKBONES))}")
