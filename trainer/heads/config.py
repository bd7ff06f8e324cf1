"""The ``loss`` configuration section and the heads' names (no torch here).

The choice lists of the heads live here so that a configuration loads without torch:
:data:`MARGINS` (the names :func:`trainer.heads.margins.build_margin` registers),
:data:`NEGATIVE_MODES` (:class:`trainer.heads.UNPG`), :data:`STATE_DTYPE_NAMES`
(:data:`trainer.heads.STATE_DTYPES`). The rules the heads share with the section
(:func:`sample_rate_ok`, :func:`wisk_ok`) are written once, here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

from trainer.section import ConfigError, at_least_one, need, one_of

#: loss.margin: the margins trainer.heads.margins registers (a test checks they agree)
MARGINS = ("arcface", "cosface", "combined", "adaface", "magface", "curricularface")
#: loss.negatives: UNPG pairs over the gathered global batch or each rank's own
NEGATIVE_MODES = ("global", "local")
#: loss.state_dtype: storage of the class centres and their momentum (trainer.heads.STATE_DTYPES)
STATE_DTYPE_NAMES = ("fp32", "bf16")
#: loss.head_init
HEAD_INITS = ("random", "imprint")


def sample_rate_ok(rate: float) -> bool:
    """Partial FC's sampling rate is in (0, 1]."""
    return 0.0 < rate <= 1.0


def wisk_ok(wisk: float) -> bool:
    """UNPG's whisker width is a finite number >= 0."""
    return wisk >= 0 and math.isfinite(wisk)


@dataclass
class LossConfig:
    margin: str = "arcface"            # trainer.heads.MARGINS
    s: float = 64.0
    m: float = 0.5                     # ArcFace angular / CosFace additive margin
    margin_list: List[float] = field(default_factory=lambda: [1.0, 0.5, 0.0])  # combined (m1, m2, m3)
    unpg: bool = False                 # add UNPG metric negatives (docs/design.md, the loss)
    wisk: float = 1.5                  # box-and-whisker width w
    negatives: str = "global"          # UNPG pairs over the gathered global batch | "local" (per rank)
    unpg_sharded: Optional[bool] = None  # global pairs split over ranks (None: when world size > 1)
    sample_rate: float = 1.0           # Partial FC sampling rate (docs/design.md, sharding)
    state_dtype: str = "fp32"          # fp32 | bf16: storage of the class centres and their momentum
    h: float = 0.333                   # adaface: margin scaler width (uses s and m too)
    t_alpha: float = 0.01              # adaface: EMA rate of the global-batch norm statistics
    l_a: float = 10.0                  # magface: norm range [l_a, u_a] ...
    u_a: float = 110.0
    l_m: float = 0.45                  # magface: ... mapped linearly to margins [l_m, u_m]
    u_m: float = 0.8
    lambda_g: float = 35.0             # magface: weight of the norm regulariser g(a)
    head_init: str = "random"          # random | imprint (class centres = normalised mean embeddings)
    imprint_max_per_class: Optional[int] = None  # imprint: the first N images of each class (None: all)

    def __post_init__(self) -> None:
        one_of("loss.margin", self.margin, MARGINS)
        one_of("loss.negatives", self.negatives, NEGATIVE_MODES)
        one_of("loss.state_dtype", self.state_dtype, STATE_DTYPE_NAMES)
        one_of("loss.head_init", self.head_init, HEAD_INITS)
        at_least_one("loss.", self, ("imprint_max_per_class",))
        for n in ("s", "m", "wisk"):
            need("loss." + n, getattr(self, n), math.isfinite(getattr(self, n)), "a finite number")
        need("loss.s", self.s, self.s > 0, "> 0 (the logit scale)")
        need("loss.m", self.m, self.m >= 0, ">= 0")
        need("loss.wisk", self.wisk, wisk_ok(self.wisk), ">= 0")
        for n in ("h", "lambda_g", "l_m"):
            v = getattr(self, n)
            need("loss." + n, v, math.isfinite(v) and v >= 0, "a finite number >= 0")
        need("loss.t_alpha", self.t_alpha, 0 < self.t_alpha <= 1, "in (0, 1]")
        need("loss.l_a", self.l_a, math.isfinite(self.l_a) and self.l_a > 0, "> 0")
        need("loss.u_a", self.u_a, math.isfinite(self.u_a) and self.u_a > self.l_a, f"> loss.l_a ({self.l_a})")
        need("loss.u_m", self.u_m, math.isfinite(self.u_m) and self.u_m >= self.l_m, f">= loss.l_m ({self.l_m})")
        if len(self.margin_list) == 3:
            m1, m2, m3 = self.margin_list
            need("loss.margin_list", self.margin_list, all(math.isfinite(x) for x in self.margin_list) and m1 > 0
                 and m2 >= 0 and m3 >= 0, "(m1, m2, m3) with m1 > 0, m2 >= 0, m3 >= 0")
        if not sample_rate_ok(self.sample_rate):
            raise ConfigError(f"config key 'loss.sample_rate' must be in (0, 1], got {self.sample_rate}")
        if len(self.margin_list) != 3:
            raise ConfigError("config key 'loss.margin_list' needs 3 values (m1, m2, m3)")
