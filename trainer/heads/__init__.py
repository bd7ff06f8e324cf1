"""Margin-softmax heads: Partial FC (model parallel) with optional UNPG negatives."""
from trainer.collectives import class_range
from trainer.heads.adaptive import AdaFace, AdaptiveMargin, CurricularFace, MagFace
from trainer.heads.margins import MARGINS, ArcFace, CombinedMargin, CosFace, Margin, build_margin, margin_from_list
from trainer.heads.optim import STATE_DTYPES, PartialFCSGD
from trainer.heads.partial_fc import PartialFC
from trainer.heads.unpg import UNPG

__all__ = [
    "AdaFace",
    "AdaptiveMargin",
    "CurricularFace",
    "MagFace",
    "ArcFace",
    "CombinedMargin",
    "CosFace",
    "Margin",
    "PartialFC",
    "PartialFCSGD",
    "STATE_DTYPES",
    "UNPG",
    "MARGINS",
    "build_margin",
    "class_range",
    "margin_from_list",
]
