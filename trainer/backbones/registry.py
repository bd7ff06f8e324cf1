"""Backbone registry (timm-style): ``get_backbone(name, num_features=512, **options)``.

Names: insightface's (r18, r34, r50, r100, r200, mbf, mbf_large) and ours
(iresnetNN / mobilefacenet aliases, ``tiny``). Every constructor takes the same
keywords; ``None`` means "the backbone's default" and is dropped, and an option a
backbone does not have is an error naming it:

- ``num_features``       embedding size (all)
- ``dropout``            before the embedding layer (iresnet, tiny)
- ``grad_checkpointing`` recompute stages in backward (iresnet, tiny)
- ``width``              channel width (tiny)
- ``norm``               "batch" | "none" (tiny: "none" has no batch-dependent layer)

Precision is the trainer's (autocast); backbones carry no precision flag.
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, List, Optional

from torch import nn

from .config import BACKBONES
from .iresnet import IResNet, iresnet
from .mobilefacenet import MobileFaceNet, mobilefacenet
from .tiny import TinyCNN

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}

#: the uniform constructor keywords, besides num_features
OPTIONS = ("dropout", "grad_checkpointing", "width", "norm")


def register_backbone(*names: str) -> Callable:
    """Decorator: register a constructor ``fn(num_features=..., **options)`` under ``names``
    (each one of :data:`trainer.backbones.config.BACKBONES`, which the configuration reads
    without torch)."""
    missing = [n for n in names if n not in BACKBONES]
    if missing:
        raise ValueError(f"backbone name {missing[0]!r} is not in trainer.backbones.config.BACKBONES; add it there")

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        for n in names:
            if n in _REGISTRY:
                raise ValueError(f"backbone name {n!r} registered twice")
            _REGISTRY[n] = fn
        return fn

    return deco


def _iresnet_factory(depth: int) -> Callable[..., nn.Module]:
    def build(num_features: int = 512, dropout: float = 0.0, grad_checkpointing: bool = False) -> nn.Module:
        return iresnet(depth, num_features=num_features, dropout=dropout, grad_checkpointing=grad_checkpointing)

    return build


for _d in (18, 34, 50, 100, 200):
    register_backbone(f"r{_d}", f"iresnet{_d}")(_iresnet_factory(_d))


@register_backbone("mbf", "mobilefacenet")
def _mbf(num_features: int = 512) -> nn.Module:
    return mobilefacenet(num_features=num_features)


@register_backbone("mbf_large")
def _mbf_large(num_features: int = 512) -> nn.Module:
    return mobilefacenet(num_features=num_features, large=True)


@register_backbone("tiny")
def _tiny(num_features: int = 512, dropout: float = 0.0, grad_checkpointing: bool = False,
          width: int = 16, norm: str = "batch") -> nn.Module:
    return TinyCNN(num_features=num_features, width=width, dropout=dropout, norm=norm,
                   grad_checkpointing=grad_checkpointing)


def available_backbones() -> List[str]:
    return sorted(_REGISTRY)


def get_backbone(name: str, num_features: int = 512, *, dropout: Optional[float] = None,
                 grad_checkpointing: Optional[bool] = None, width: Optional[int] = None,
                 norm: Optional[str] = None) -> nn.Module:
    """Build a registered backbone; ``None`` options keep the backbone's default."""
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(available_backbones())}")
    fn = _REGISTRY[key]
    given = {k: v for k, v in dict(dropout=dropout, grad_checkpointing=grad_checkpointing,
                                   width=width, norm=norm).items() if v is not None}
    accepted = inspect.signature(fn).parameters
    bad = [k for k in given if k not in accepted]
    if bad:
        raise ValueError(f"backbone {name!r} has no option {bad[0]!r} "
                         f"(it takes: {', '.join(k for k in accepted if k != 'num_features') or 'none'})")
    return fn(num_features=num_features, **given)


__all__ = ["get_backbone", "available_backbones", "register_backbone", "OPTIONS", "IResNet", "iresnet",
           "MobileFaceNet", "mobilefacenet", "TinyCNN"]
