"""Additive-angular / additive-cosine margins on the target logit (docs/design.md §1).

A margin maps the target cosine ``c = cos(theta)`` to ``f(c)``; the target logit
is ``s * f(c)`` and every other logit is ``s * c``. Each margin gives ``f`` and
its exact derivative ``f'`` in closed form, because the head's fused backward
(see ``partial_fc.py``) applies the chain rule itself.

theta + m > pi (ArcFace / Combined): ``cos(theta + m)`` is not monotonic in
theta. For a sample whose angle to its own centre exceeds ``pi - m`` the exact
margin logit *rises* as theta grows, so its gradient pushes the embedding
further from its centre. We keep the exact function by default (it is what the
paper and docs/design.md §1 define; with random init and D = 512, cos stays near 0
and the region, cos < cos(pi - m) ~ -0.88 for m = 0.5, is essentially never
reached). ``ArcFace(..., pi_fallback=True)`` switches to insightface's fix:
for theta > pi - m use the monotonic ``cos(theta) - m * sin(m)``.

insightface's arcface_torch computes the ArcFace logit under ``no_grad`` and so
back-propagates as if ``f'(c) = 1`` (a straight-through shortcut). We use the
exact derivative; ``straight_through=True`` reproduces insightface's choice.

The exact derivative contains ``1 / sin(theta)``, infinite at ``c = +-1``; sin
is floored at ``_SIN_EPS`` so the gradient stays finite there (it is exact for
every ``|c| < 1 - 1e-12``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Dict, Optional, Protocol, Tuple

import torch

from trainer.heads.config import MARGINS

_SIN_EPS = 1e-12


def _sin_theta(c: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(torch.clamp(1.0 - c * c, min=0.0))


#: per-row tensors a margin's ``prepare`` hands to its other hooks (by name)
Prep = Dict[str, torch.Tensor]


class SoftmaxMargin(Protocol):
    """What the fused softmax (``softmax.py``) and ``PartialFC`` use of a margin: the fixed
    margins below and the adaptive ones (``adaptive.py``) alike."""

    cos_eps: ClassVar[float]
    needs_target_cos: ClassVar[bool]
    modulates_negatives: ClassVar[bool]

    @property
    def s(self) -> float: ...

    def prepare(self, x_norm: torch.Tensor, target_cos: Optional[torch.Tensor]) -> Prep: ...

    def target_value(self, c: torch.Tensor, idx: Optional[torch.Tensor], prep: Prep) -> torch.Tensor: ...

    def target_grads(self, c: torch.Tensor, prep: Prep) -> Tuple[torch.Tensor, Optional[torch.Tensor]]: ...

    def negatives(self, cos: torch.Tensor, prep: Prep, need_grad: bool = True
                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]: ...

    def extra_loss(self, global_x: torch.Tensor) -> Optional[torch.Tensor]: ...

    def stats(self) -> Dict[str, torch.Tensor]: ...


@dataclass(frozen=True, kw_only=True)
class Margin:
    """Base class: scale ``s`` plus the option to use insightface's straight-through gradient."""

    s: float = 64.0
    straight_through: bool = False

    def value(self, c: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def derivative(self, c: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target(self, c: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(f(c), f'(c))`` for clamped target cosines ``c``."""
        value = self.value(c)
        if self.straight_through:
            return value, torch.ones_like(c)
        return value, self.derivative(c)

    # Hooks of the fused softmax (see ``adaptive.py`` for margins that use them):
    # a fixed margin has no state, no per-row parameter, no extra term.
    cos_eps: ClassVar[float] = 0.0
    needs_target_cos: ClassVar[bool] = False
    modulates_negatives: ClassVar[bool] = False

    def prepare(self, x_norm: torch.Tensor, target_cos: Optional[torch.Tensor]) -> Prep:
        return {}

    def target_value(self, c: torch.Tensor, idx: Optional[torch.Tensor], prep: Prep) -> torch.Tensor:
        return self.value(c)

    def target_grads(self, c: torch.Tensor, prep: Prep) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.target(c)[1], None

    def negatives(self, cos: torch.Tensor, prep: Prep, need_grad: bool = True
                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Not called: a fixed margin leaves the non-target cosines alone (``modulates_negatives``)."""
        raise NotImplementedError

    def extra_loss(self, global_x: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    def stats(self) -> Dict[str, torch.Tensor]:
        """Running state worth monitoring, by name (none for a fixed margin)."""
        return {}


@dataclass(frozen=True, kw_only=True)
class ArcFace(Margin):
    """``f(c) = cos(theta + m)``; insightface ``margin_list = (1.0, m, 0.0)``."""

    m: float = 0.5
    pi_fallback: bool = False

    def value(self, c: torch.Tensor) -> torch.Tensor:
        # cos(theta + m) = c cos m - sin(theta) sin m
        out = c * math.cos(self.m) - _sin_theta(c) * math.sin(self.m)
        if self.pi_fallback:
            out = torch.where(c > math.cos(math.pi - self.m), out, c - self.m * math.sin(self.m))
        return out

    def derivative(self, c: torch.Tensor) -> torch.Tensor:
        # d/dc [c cos m - sqrt(1 - c^2) sin m] = cos m + c sin m / sin(theta)
        out = math.cos(self.m) + c * math.sin(self.m) / torch.clamp(_sin_theta(c), min=_SIN_EPS)
        if self.pi_fallback:
            out = torch.where(c > math.cos(math.pi - self.m), out, torch.ones_like(c))
        return out


@dataclass(frozen=True, kw_only=True)
class CosFace(Margin):
    """``f(c) = c - m``; insightface ``margin_list = (1.0, 0.0, m)``."""

    m: float = 0.4

    def value(self, c: torch.Tensor) -> torch.Tensor:
        return c - self.m

    def derivative(self, c: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(c)


@dataclass(frozen=True, kw_only=True)
class CombinedMargin(Margin):
    """``f(c) = cos(m1 * theta + m2) - m3``: insightface's ``margin_list = (m1, m2, m3)``."""

    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0

    def value(self, c: torch.Tensor) -> torch.Tensor:
        theta = torch.acos(torch.clamp(c, -1.0, 1.0))
        return torch.cos(self.m1 * theta + self.m2) - self.m3

    def derivative(self, c: torch.Tensor) -> torch.Tensor:
        # d/dc cos(m1 acos(c) + m2) = m1 sin(m1 theta + m2) / sin(theta)
        theta = torch.acos(torch.clamp(c, -1.0, 1.0))
        return self.m1 * torch.sin(self.m1 * theta + self.m2) / torch.clamp(
            _sin_theta(c), min=_SIN_EPS
        )


def margin_from_list(margin_list: Tuple[float, float, float], s: float = 64.0) -> Margin:
    """insightface config ``margin_list = (m1, m2, m3)`` -> the matching margin object."""
    m1, m2, m3 = (float(v) for v in margin_list)
    if m1 == 1.0 and m3 == 0.0:
        return ArcFace(s=s, m=m2)
    if m1 == 1.0 and m2 == 0.0:
        return CosFace(s=s, m=m3)
    return CombinedMargin(s=s, m1=m1, m2=m2, m3=m3)




#: a margin builder ``fn(s, m, margin_list, options) -> margin``
MarginBuilder = Callable[[float, float, Tuple[float, float, float], Dict[str, float]], SoftmaxMargin]

#: margin name -> builder; the names are :data:`trainer.heads.config.MARGINS` (the config's ``loss.margin``)
_MARGIN_BUILDERS: Dict[str, MarginBuilder] = {}


def register_margin(name: str) -> Callable[[MarginBuilder], MarginBuilder]:
    """Decorator: register a margin builder under ``name`` (one of ``MARGINS``, which the
    configuration reads without torch)."""
    if name not in MARGINS:
        raise ValueError(f"margin {name!r} is not in trainer.heads.config.MARGINS; add it there")

    def deco(fn: MarginBuilder) -> MarginBuilder:
        if name in _MARGIN_BUILDERS:
            raise ValueError(f"margin name {name!r} registered twice")
        _MARGIN_BUILDERS[name] = fn
        return fn
    return deco


def available_margins() -> Tuple[str, ...]:
    return tuple(sorted(_MARGIN_BUILDERS))


@register_margin("arcface")
def _arcface(s: float, m: float, margin_list: Tuple[float, float, float], options: Dict[str, float]) -> Margin:
    return ArcFace(s=s, m=m)


@register_margin("cosface")
def _cosface(s: float, m: float, margin_list: Tuple[float, float, float], options: Dict[str, float]) -> Margin:
    return CosFace(s=s, m=m)


@register_margin("combined")
def _combined(s: float, m: float, margin_list: Tuple[float, float, float], options: Dict[str, float]) -> Margin:
    return margin_from_list(margin_list, s=s)


# the adaptive margins (trainer/heads/adaptive.py) are built here too, imported on use:
# adaptive.py then imports nothing of this module (no import circle)
@register_margin("adaface")
def _adaface(s: float, m: float, margin_list: Tuple[float, float, float], options: Dict[str, float]) -> SoftmaxMargin:
    from trainer.heads.adaptive import AdaFace

    return AdaFace(s=s, m=m, **{k: options[k] for k in ("h", "t_alpha") if k in options})


@register_margin("magface")
def _magface(s: float, m: float, margin_list: Tuple[float, float, float], options: Dict[str, float]) -> SoftmaxMargin:
    from trainer.heads.adaptive import MagFace

    return MagFace(s=s, **{k: options[k] for k in ("l_a", "u_a", "l_m", "u_m", "lambda_g") if k in options})


@register_margin("curricularface")
def _curricularface(s: float, m: float, margin_list: Tuple[float, float, float],
                    options: Dict[str, float]) -> SoftmaxMargin:
    from trainer.heads.adaptive import CurricularFace

    return CurricularFace(s=s, m=m)


def build_margin(name: str, s: float = 64.0, m: float = 0.5,
                 margin_list: Tuple[float, float, float] = (1.0, 0.5, 0.0), **options: float) -> SoftmaxMargin:
    """A registered margin by name. ``arcface`` / ``cosface`` / ``curricularface`` use ``m``;
    ``combined`` uses insightface's ``margin_list`` (m1, m2, m3) through :func:`margin_from_list`;
    ``adaface`` uses ``m`` and ``options`` h, t_alpha; ``magface`` uses ``options`` l_a, u_a,
    l_m, u_m, lambda_g (trainer/heads/adaptive.py). Options a margin does not use are ignored."""
    if name not in available_margins():
        raise ValueError(f"unknown margin {name!r}; valid: {', '.join(MARGINS)}")
    return _MARGIN_BUILDERS[name](s, m, margin_list, options)
