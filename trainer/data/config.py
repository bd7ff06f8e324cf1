"""The ``data`` configuration section and the loaders' choice lists (no torch here)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from trainer.data.augment import AugmentConfig
from trainer.section import at_least_one, need, one_of

#: data.backend choices
BACKENDS = ("auto", "dali", "torch")
#: data.shuffle_mode choices (trainer.data.plan)
SHUFFLE_MODES = ("block", "global")


@dataclass
class DataConfig:
    train_dir: str = ""                # folder with train.rec/train.idx/property
    num_classes: Optional[int] = None  # if set, must equal the dataset's class count
    batch_size: int = 128              # per rank, per micro-step
    backend: str = "auto"              # auto | dali | torch (trainer.data.BACKENDS)
    num_threads: int = 4
    shuffle_mode: str = "block"        # block: permuted file blocks read in order + buffer | global
    block_bytes: Optional[int] = None  # block size in bytes of .rec (None: the loader's default, 4 MiB)
    shuffle_buffer: Optional[int] = None  # images in the mixing buffer (None: the loader's default)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # all off by default: flip only
    # seconds a rank waits on the node's label-scan / index lock while its holder shows no
    # progress (the holder marks progress at every piece it scans); then a clear error
    lock_timeout: float = 300.0
    # a resume at another world size / per-rank batch keeps the run's global batch (images per
    # optimizer step) by deriving optim.grad_accum; false: optim.grad_accum as configured
    # (trainer.elastic, docs/launch.md "Elastic")
    keep_global_batch: bool = True

    def __post_init__(self) -> None:
        one_of("data.backend", self.backend, BACKENDS)
        one_of("data.shuffle_mode", self.shuffle_mode, SHUFFLE_MODES)
        at_least_one("data.", self, ("batch_size", "num_threads", "num_classes", "block_bytes", "shuffle_buffer"))
        need("data.num_classes", self.num_classes, self.num_classes is None or self.num_classes >= 2,
             ">= 2 (a classifier needs at least two identities)")
        need("data.lock_timeout", self.lock_timeout, math.isfinite(self.lock_timeout) and self.lock_timeout > 0,
             "a finite number of seconds > 0")
