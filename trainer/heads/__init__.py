"""Margin-softmax heads: Partial FC (model parallel) with optional UNPG negatives."""
from trainer.collectives import class_range
from trainer.heads.adaptive import AdaFace, AdaptiveMargin, CurricularFace, MagFace
from trainer.heads.margins import ArcFace, CombinedMargin, CosFace, Margin, margin_from_list
from trainer.heads.optim import PartialFCSGD
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
    "UNPG",
    "class_range",
    "margin_from_list",
]
