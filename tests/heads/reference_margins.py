"""Dense single-process references of AdaFace, MagFace and CurricularFace.

Float64 autograd over the full logit matrix, written from the papers' formulas
in the form of the authors' training code (one-hot masks, full [N, C] tensors,
the running statistics updated from the whole batch before use). Independent
of trainer.heads on purpose. ``state`` is a dict of floats, returned updated.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from tests.heads.reference import pair_logits

PARAMS = {
    "adaface": dict(m=0.4, h=0.333, t_alpha=0.01),
    "magface": dict(l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0),
    "curricularface": dict(m=0.5),
}
INITIAL_STATE = {"adaface": {"batch_mean": 20.0, "batch_std": 100.0}, "magface": {},
                 "curricularface": {"t": 0.0}}


def _onehot(labels, n_classes, like):
    oh = torch.zeros(labels.shape[0], n_classes, dtype=like.dtype)
    oh[torch.arange(labels.shape[0]), labels] = 1.0
    return oh


def adaface_logits(x, labels, w, s, p, state):
    eps = 1e-3
    x_hat = x / x.norm(dim=1, keepdim=True)
    w_hat = w / w.norm(dim=1, keepdim=True)
    cos = (x_hat @ w_hat.t()).clamp(-1 + eps, 1 - eps)
    safe = x.norm(dim=1, keepdim=True).clamp(0.001, 100).detach()
    mean, std = safe.mean(), safe.std()
    bm = mean * p["t_alpha"] + (1 - p["t_alpha"]) * state["batch_mean"]
    bs = std * p["t_alpha"] + (1 - p["t_alpha"]) * state["batch_std"]
    k = ((safe - bm) / (bs + eps) * p["h"]).clamp(-1, 1)
    oh = _onehot(labels, w.shape[0], x)
    theta = cos.acos()
    theta_m = (theta + oh * (-p["m"] * k)).clamp(eps, math.pi - eps)
    out = theta_m.cos() - oh * (p["m"] + p["m"] * k)
    return s * out, torch.zeros((), dtype=x.dtype), {"batch_mean": float(bm), "batch_std": float(bs)}


def magface_logits(x, labels, w, s, p, state):
    a = x.norm(dim=1, keepdim=True).clamp(p["l_a"], p["u_a"])
    margin = (p["u_m"] - p["l_m"]) / (p["u_a"] - p["l_a"]) * (a - p["l_a"]) + p["l_m"]
    x_hat = x / x.norm(dim=1, keepdim=True)
    w_hat = w / w.norm(dim=1, keepdim=True)
    cos = (x_hat @ w_hat.t()).clamp(-1, 1)
    sin = torch.sqrt(1.0 - cos.pow(2))
    cos_m = cos * torch.cos(margin) - sin * torch.sin(margin)
    cos_m = torch.where(cos > 0, cos_m, cos)  # easy margin
    oh = _onehot(labels, w.shape[0], x)
    out = oh * cos_m + (1 - oh) * cos
    g = (a / p["u_a"] ** 2 + 1.0 / a).mean()
    return s * out, p["lambda_g"] * g, {}


def curricular_logits(x, labels, w, s, p, state):
    m = p["m"]
    x_hat = x / x.norm(dim=1, keepdim=True)
    w_hat = w / w.norm(dim=1, keepdim=True)
    cos = (x_hat @ w_hat.t()).clamp(-1, 1)
    n = x.shape[0]
    tl = cos[torch.arange(n), labels].view(-1, 1)
    sin = torch.sqrt(1.0 - tl.pow(2))
    ctm = tl * math.cos(m) - sin * math.sin(m)
    mask = cos > ctm
    final = torch.where(tl > math.cos(math.pi - m), ctm, tl - math.sin(math.pi - m) * m)
    t = tl.detach().mean() * 0.01 + (1 - 0.01) * state["t"]
    out = torch.where(mask, cos * (t + cos), cos)
    out = out.scatter(1, labels.view(-1, 1), final)
    return s * out, torch.zeros((), dtype=x.dtype), {"t": float(t)}


LOGITS = {"adaface": adaface_logits, "magface": magface_logits, "curricularface": curricular_logits}


def reference_loss(kind: str, x, labels, w, s: float, params: dict, state: dict,
                   wisk: Optional[float] = None, groups: Optional[Sequence[int]] = None):
    """(loss, new_state): mean CE over the rows (+ UNPG's kept pairs as shared extra
    columns, + MagFace's lambda_g * g term)."""
    z, extra, new_state = LOGITS[kind](x, labels, w, s, params, state)
    n = x.shape[0]
    x_hat = x / x.norm(dim=1, keepdim=True)
    extras = pair_logits(x_hat, labels, s, wisk, groups)
    losses = [-z[i, labels[i]] + torch.logsumexp(torch.cat([z[i], extras[i]]), dim=0) for i in range(n)]
    return torch.stack(losses).mean() + extra, {**state, **new_state}


def make_margin(kind: str, s: float, params: dict):
    from trainer.heads import AdaFace, CurricularFace, MagFace

    cls = {"adaface": AdaFace, "magface": MagFace, "curricularface": CurricularFace}[kind]
    return cls(s=s, **params)
