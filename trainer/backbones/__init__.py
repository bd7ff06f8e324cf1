"""Backbones: a registry (timm-style, :mod:`trainer.backbones.registry`) of
``get_backbone(name, num_features=512, **options)``, and the ``model`` configuration
section (:mod:`trainer.backbones.config`, no torch). The torch parts are imported on
first use, so that loading a configuration does not import torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from trainer.backbones.config import BACKBONES, ModelConfig

if TYPE_CHECKING:
    from trainer.backbones.iresnet import IResNet, iresnet
    from trainer.backbones.mobilefacenet import MobileFaceNet, mobilefacenet
    from trainer.backbones.registry import OPTIONS, available_backbones, get_backbone, register_backbone
    from trainer.backbones.tiny import TinyCNN

_LAZY = ("get_backbone", "available_backbones", "register_backbone", "OPTIONS", "IResNet", "iresnet",
         "MobileFaceNet", "mobilefacenet", "TinyCNN")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("trainer.backbones.registry"), name)
    raise AttributeError(f"module 'trainer.backbones' has no attribute {name!r}")


__all__ = ["BACKBONES", "ModelConfig", "get_backbone", "available_backbones", "register_backbone", "OPTIONS",
           "IResNet", "iresnet", "MobileFaceNet", "mobilefacenet", "TinyCNN"]
