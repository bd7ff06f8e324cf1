"""Backbone registry: ``get_backbone(name, num_features=512, **kw)``.

Accepts insightface's names (r18, r34, r50, r100, r200, mbf, mbf_large) and
ours (iresnetNN aliases, ``tiny``).
"""
from __future__ import annotations

from typing import Callable, Dict, List

from torch import nn

from .iresnet import IResNet, iresnet
from .mobilefacenet import MobileFaceNet, mobilefacenet
from .tiny import TinyCNN

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}
for _d in (18, 34, 50, 100, 200):
    _REGISTRY[f"r{_d}"] = (lambda d: lambda **kw: iresnet(d, **kw))(_d)
    _REGISTRY[f"iresnet{_d}"] = _REGISTRY[f"r{_d}"]
_REGISTRY["mbf"] = lambda **kw: mobilefacenet(**kw)
_REGISTRY["mobilefacenet"] = _REGISTRY["mbf"]
_REGISTRY["mbf_large"] = lambda **kw: mobilefacenet(large=True, **kw)
_REGISTRY["tiny"] = lambda **kw: TinyCNN(**kw)


def available_backbones() -> List[str]:
    return sorted(_REGISTRY)


def get_backbone(name: str, num_features: int = 512, **kw) -> nn.Module:
    """Build a backbone by name. Extra keywords go to its constructor
    (iresnet: dropout, fp16, grad_checkpointing; mbf: fp16; tiny: width, dropout)."""
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(available_backbones())}")
    return _REGISTRY[key](num_features=num_features, **kw)


__all__ = ["get_backbone", "available_backbones", "IResNet", "iresnet", "MobileFaceNet",
           "mobilefacenet", "TinyCNN"]
