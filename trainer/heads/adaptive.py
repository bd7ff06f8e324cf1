"""Margins with running state or per-sample parameters: AdaFace, MagFace, CurricularFace.

They plug into the fused, sharded softmax (``softmax.py``) through the same
interface as ``margins.Margin`` plus three hooks (``prepare``, ``negatives``,
``extra_loss``). Every statistic is taken over the GLOBAL batch: the softmax
sees the all-gathered embeddings, so R ranks x B rows behave exactly as one
process with R*B rows. Running state is kept in buffers (0-dim tensors) of the
margin module, which ``PartialFC`` registers as its submodule ``margin``: the
head's ``state_dict`` carries it (``margin.batch_mean`` ...), it is identical on
every rank, and checkpoints restore it at any world size. A head state without
it (an ArcFace run, an arcface_torch import) loads with the state at its
current (initial) values.

Notation: ``c`` target cosine (clamped), ``theta = acos c``, ``a = |x|`` the raw
embedding norm of the row, ``s`` the scale.

AdaFace (Kim et al., CVPR 2022; the authors' ``head.py``), eps = 1e-3::

    every cosine clamped to [-1 + eps, 1 - eps]
    a~   = clip(a, 0.001, 100), detached (no gradient through the norm)
    mu   <- t_alpha * mean(a~) + (1 - t_alpha) * mu          (buffer batch_mean, init 20)
    sig  <- t_alpha * std(a~)  + (1 - t_alpha) * sig         (buffer batch_std, init 100; std unbiased)
    k    = clip(h * (a~ - mu) / (sig + eps), -1, 1)           (statistics updated before use)
    f(c) = cos(clip(theta - m k, eps, pi - eps)) - (m + m k)
    f'(c) = sin(clip(...)) / sin(theta) inside the clip, 0 outside

MagFace (Meng et al., CVPR 2021; the authors' ``MagLinear``/``MagLoss``, easy margin)::

    a~   = clip(a, l_a, u_a)       (gradient flows through the norm)
    m(a) = (u_m - l_m) / (u_a - l_a) * (a~ - l_a) + l_m
    f(c, a) = cos(theta + m(a)) if c > 0 else c
    df/dc = cos m + c sin m / sin(theta);  df/da = -sin(theta + m) m'(a)   (c > 0)
    loss += lambda_g * mean_i g(a~_i),  g(a) = a / u_a^2 + 1 / a   (global-batch mean)

CurricularFace (Huang et al., CVPR 2020; the authors' ``CurricularFace`` head)::

    t    <- 0.01 * mean_i c_i + 0.99 * t       (buffer t, init 0; plain clamped target
                                               cosines of the global batch, updated before use)
    T_i  = cos(theta_i + m)                    (hard-negative threshold of row i)
    N(cos_ij) = cos_ij (t + cos_ij) if cos_ij > T_i else cos_ij      (non-target logits)
    f(c) = cos(theta + m) if c > cos(pi - m) else c - m sin(pi - m)
    dN/dcos = t + 2 cos (t is a constant) on hard entries, 1 elsewhere

Distributed: AdaFace and MagFace need only the norms of the gathered batch.
CurricularFace needs every row's target cosine on every shard (for ``t`` and
for ``T_i``, which modulates the negatives of all shards): the owner rank of
each target computes it and one all-reduce SUM of N values shares it
(``needs_target_cos``; see ``softmax.py``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple, cast

import torch
from torch import nn

_SIN_EPS = 1e-12

Prep = Dict[str, torch.Tensor]


def _sin_theta(c: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(torch.clamp(1.0 - c * c, min=0.0))


def _row_norm(x: torch.Tensor) -> torch.Tensor:
    """``|x_i|`` per row (``Tensor.norm`` is partly unannotated in torch: one typed door)."""
    return cast(torch.Tensor, x.norm(dim=1))  # pyright: ignore[reportUnknownMemberType]


def _pick(t: torch.Tensor, idx: Optional[torch.Tensor]) -> torch.Tensor:
    return t if idx is None else t[idx]


class AdaptiveMargin(nn.Module):
    """Base class: the hooks the fused softmax calls (defaults: no effect).

    cos_eps: every cosine is clamped to ``[-1 + cos_eps, 1 - cos_eps]``.
    needs_target_cos: ``prepare`` receives every row's target cosine.
    modulates_negatives: non-target cosines go through ``negatives``.
    """

    cos_eps: ClassVar[float] = 0.0
    needs_target_cos: ClassVar[bool] = False
    modulates_negatives: ClassVar[bool] = False

    def __init__(self, s: float) -> None:
        super().__init__()
        self.s = float(s)

    def prepare(self, x_norm: torch.Tensor, target_cos: Optional[torch.Tensor]) -> Prep:
        """Once per forward, before any logit: update running state (no gradient) and
        return the per-row tensors the other hooks use. ``x_norm``: [N] raw norms of the
        global batch; ``target_cos``: [N] clamped target cosines, or None."""
        return {}

    def target_value(self, c: torch.Tensor, idx: Optional[torch.Tensor], prep: Prep) -> torch.Tensor:
        """``f`` at the target cosines ``c`` of global rows ``idx`` (None: all rows)."""
        raise NotImplementedError

    def target_grads(self, c: torch.Tensor, prep: Prep) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(df/dc, df/d|x|)`` for all N rows (the second is None when f ignores the norm)."""
        raise NotImplementedError

    def negatives(self, cos: torch.Tensor, prep: Prep, need_grad: bool = True
                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Modulated non-target cosines of a [N, k] block and (if need_grad) their derivative."""
        raise NotImplementedError

    def extra_loss(self, global_x: torch.Tensor) -> Optional[torch.Tensor]:
        """A term added to the head's loss (computed identically on every rank)."""
        return None

    def stats(self) -> Dict[str, torch.Tensor]:
        """The running state by name (device tensors; PartialFC snapshots them each step):
        every buffer of the margin (AdaFace's ``batch_mean``/``batch_std``, CurricularFace's ``t``)."""
        return {name: buf for name, buf in self._buffers.items() if buf is not None}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self._params().items())

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # A head state without this margin's running state (a run with another margin, an
        # arcface_torch import) keeps the current values (initial ones on a fresh head).
        for name, buf in self._buffers.items():
            if buf is not None and prefix + name not in state_dict:
                state_dict[prefix + name] = buf.detach().clone()
        load = cast(Callable[..., None], super()._load_from_state_dict)  # pyright: ignore[reportUnknownMemberType]
        load(state_dict, prefix, *args, **kwargs)

    def _params(self) -> Dict[str, float]:
        return {"s": self.s}


class AdaFace(AdaptiveMargin):
    cos_eps: ClassVar[float] = 1e-3
    batch_mean: torch.Tensor  # buffers (registered in __init__)
    batch_std: torch.Tensor

    def __init__(self, s: float = 64.0, m: float = 0.4, h: float = 0.333, t_alpha: float = 0.01) -> None:
        super().__init__(s)
        if not 0.0 <= t_alpha <= 1.0:
            raise ValueError(f"AdaFace t_alpha must be in [0, 1], got {t_alpha}")
        self.m, self.h, self.t_alpha, self.eps = float(m), float(h), float(t_alpha), 1e-3
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    def _params(self) -> Dict[str, float]:
        return dict(s=self.s, m=self.m, h=self.h, t_alpha=self.t_alpha)

    def prepare(self, x_norm: torch.Tensor, target_cos: Optional[torch.Tensor]) -> Prep:
        safe = x_norm.detach().clamp(0.001, 100.0).to(self.batch_mean.dtype)
        a = self.t_alpha
        with torch.no_grad():
            self.batch_mean.copy_(safe.mean() * a + (1 - a) * self.batch_mean)
            if safe.numel() > 1:  # the std of one value is undefined: keep the running one
                self.batch_std.copy_(safe.std() * a + (1 - a) * self.batch_std)
        k = ((safe - self.batch_mean) / (self.batch_std + self.eps) * self.h).clamp(-1.0, 1.0)
        k = k.to(x_norm.dtype)
        return {"g_ang": -self.m * k, "g_add": self.m + self.m * k}

    def target_value(self, c: torch.Tensor, idx: Optional[torch.Tensor], prep: Prep) -> torch.Tensor:
        theta = torch.acos(c)
        theta_m = torch.clamp(theta + _pick(prep["g_ang"], idx), self.eps, math.pi - self.eps)
        return torch.cos(theta_m) - _pick(prep["g_add"], idx)

    def target_grads(self, c: torch.Tensor, prep: Prep) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        theta = torch.acos(c)
        u = theta + prep["g_ang"]
        inside = (u >= self.eps) & (u <= math.pi - self.eps)
        d = torch.sin(u) / torch.clamp(_sin_theta(c), min=_SIN_EPS)
        return torch.where(inside, d, torch.zeros_like(d)), None


class MagFace(AdaptiveMargin):
    def __init__(self, s: float = 64.0, l_a: float = 10.0, u_a: float = 110.0, l_m: float = 0.45,
                 u_m: float = 0.8, lambda_g: float = 35.0) -> None:
        super().__init__(s)
        if not 0 < l_a < u_a:
            raise ValueError(f"MagFace needs 0 < l_a < u_a, got l_a={l_a}, u_a={u_a}")
        self.l_a, self.u_a, self.l_m, self.u_m = float(l_a), float(u_a), float(l_m), float(u_m)
        self.lambda_g = float(lambda_g)
        self.slope = (self.u_m - self.l_m) / (self.u_a - self.l_a)

    def _params(self) -> Dict[str, float]:
        return dict(s=self.s, l_a=self.l_a, u_a=self.u_a, l_m=self.l_m, u_m=self.u_m, lambda_g=self.lambda_g)

    def prepare(self, x_norm: torch.Tensor, target_cos: Optional[torch.Tensor]) -> Prep:
        a = x_norm.clamp(self.l_a, self.u_a)
        inside = (x_norm >= self.l_a) & (x_norm <= self.u_a)  # clamp passes gradient there
        dm = torch.where(inside, torch.full_like(a, self.slope), torch.zeros_like(a))
        return {"m": self.slope * (a - self.l_a) + self.l_m, "dm": dm}

    def target_value(self, c: torch.Tensor, idx: Optional[torch.Tensor], prep: Prep) -> torch.Tensor:
        m = _pick(prep["m"], idx)
        out = c * torch.cos(m) - _sin_theta(c) * torch.sin(m)
        return torch.where(c > 0, out, c)

    def target_grads(self, c: torch.Tensor, prep: Prep) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        m, dm = prep["m"], prep["dm"]
        sin_t = _sin_theta(c)
        d_c = torch.cos(m) + c * torch.sin(m) / torch.clamp(sin_t, min=_SIN_EPS)
        d_a = -(c * torch.sin(m) + sin_t * torch.cos(m)) * dm  # -sin(theta + m) m'(a)
        easy = c > 0
        return torch.where(easy, d_c, torch.ones_like(c)), torch.where(easy, d_a, torch.zeros_like(c))

    def extra_loss(self, global_x: torch.Tensor) -> Optional[torch.Tensor]:
        a = _row_norm(global_x).clamp(self.l_a, self.u_a)
        return self.lambda_g * (a / self.u_a**2 + 1.0 / a).mean()


class CurricularFace(AdaptiveMargin):
    needs_target_cos: ClassVar[bool] = True
    modulates_negatives: ClassVar[bool] = True
    momentum = 0.01
    t: torch.Tensor  # buffer (registered in __init__)

    def __init__(self, s: float = 64.0, m: float = 0.5) -> None:
        super().__init__(s)
        self.m = float(m)
        self.cos_m, self.sin_m = math.cos(self.m), math.sin(self.m)
        self.threshold = math.cos(math.pi - self.m)
        self.mm = math.sin(math.pi - self.m) * self.m
        self.register_buffer("t", torch.tensor(0.0))

    def _params(self) -> Dict[str, float]:
        return dict(s=self.s, m=self.m)

    def prepare(self, x_norm: torch.Tensor, target_cos: Optional[torch.Tensor]) -> Prep:
        assert target_cos is not None, "CurricularFace.needs_target_cos: the softmax passes every row's"
        with torch.no_grad():
            mean = target_cos.detach().mean().to(self.t.dtype)
            self.t.copy_(mean * self.momentum + (1 - self.momentum) * self.t)
        c = target_cos
        hard = c * self.cos_m - _sin_theta(c) * self.sin_m  # cos(theta_y + m), per row
        return {"t": self.t.detach().clone().to(c.dtype), "hard": hard}

    def target_value(self, c: torch.Tensor, idx: Optional[torch.Tensor], prep: Prep) -> torch.Tensor:
        return torch.where(c > self.threshold, c * self.cos_m - _sin_theta(c) * self.sin_m, c - self.mm)

    def target_grads(self, c: torch.Tensor, prep: Prep) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        d = self.cos_m + c * self.sin_m / torch.clamp(_sin_theta(c), min=_SIN_EPS)
        return torch.where(c > self.threshold, d, torch.ones_like(c)), None

    def negatives(self, cos: torch.Tensor, prep: Prep, need_grad: bool = True
                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        t = prep["t"]
        mask = cos > prep["hard"].unsqueeze(1)
        value = torch.where(mask, cos * (t + cos), cos)
        if not need_grad:
            return value, None
        deriv = torch.where(mask, t + 2.0 * cos, torch.ones_like(cos))
        return value, deriv

