"""Margin-softmax heads: Partial FC (model parallel) with optional UNPG negatives.

The ``loss`` section and the heads' names are in :mod:`trainer.heads.config` (no
torch); the heads themselves are imported on first use, so that loading a
configuration does not import torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from trainer.heads.config import MARGINS, NEGATIVE_MODES, STATE_DTYPE_NAMES, LossConfig

if TYPE_CHECKING:
    from trainer.collectives import class_range
    from trainer.heads.adaptive import AdaFace, AdaptiveMargin, CurricularFace, MagFace
    from trainer.heads.margins import (
        ArcFace,
        CombinedMargin,
        CosFace,
        Margin,
        available_margins,
        build_margin,
        margin_from_list,
        register_margin,
    )
    from trainer.heads.partial_fc import PartialFC
    from trainer.heads.protocol import Head
    from trainer.heads.sparse_sgd import STATE_DTYPES, PartialFCSGD
    from trainer.heads.unpg import UNPG

_LAZY = {
    "class_range": "trainer.collectives",
    **dict.fromkeys(("AdaFace", "AdaptiveMargin", "CurricularFace", "MagFace"), "trainer.heads.adaptive"),
    **dict.fromkeys(("ArcFace", "CombinedMargin", "CosFace", "Margin", "available_margins", "build_margin",
                     "margin_from_list", "register_margin"), "trainer.heads.margins"),
    **dict.fromkeys(("STATE_DTYPES", "PartialFCSGD"), "trainer.heads.sparse_sgd"),
    "PartialFC": "trainer.heads.partial_fc",
    "Head": "trainer.heads.protocol",
    "UNPG": "trainer.heads.unpg",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trainer.heads' has no attribute {name!r}")


__all__ = [
    "AdaFace",
    "AdaptiveMargin",
    "CurricularFace",
    "MagFace",
    "ArcFace",
    "CombinedMargin",
    "CosFace",
    "Head",
    "LossConfig",
    "Margin",
    "NEGATIVE_MODES",
    "PartialFC",
    "PartialFCSGD",
    "STATE_DTYPES",
    "STATE_DTYPE_NAMES",
    "UNPG",
    "MARGINS",
    "available_margins",
    "build_margin",
    "class_range",
    "margin_from_list",
    "register_margin",
]
