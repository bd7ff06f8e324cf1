"""The engine interface and the one training step both engines share."""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple

import torch
from torch import nn

from trainer.config import OptimConfig
from trainer.distributed import DistInfo

Batch = Tuple[torch.Tensor, torch.Tensor]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; training stopped instead of training on."""


@dataclass
class StepOutput:
    ok: bool                                  # False: the step was skipped (nan_policy=skip)
    losses: List[float] = field(default_factory=list)  # finite micro-batch losses
    grad_norm: Optional[float] = None         # backbone gradient norm before clipping
    images: Optional[torch.Tensor] = None     # the last micro-batch (for the image grid)


class Engine:
    """Wraps the backbone for training; owns its optimizer, precision and (loss) scaling.

    Subclasses implement the hooks (``_wrap``, ``autocast``, ``micro_context``,
    ``_backward``, ``_skip_backward``, ``_apply``, ``_skip_apply``, state);
    :meth:`train_step` is the same for every engine.
    """

    name = "base"

    def __init__(self, optim: OptimConfig, backbone: nn.Module, head: nn.Module, head_opt,
                 d: DistInfo, grad_accum: int, precision: str) -> None:
        self.optim_cfg = optim
        self.backbone = backbone          # the plain module (state_dict in insightface format)
        self.head = head
        self.head_opt = head_opt
        self.d = d
        self.accum = grad_accum
        self.precision = precision
        self.model: nn.Module = backbone  # what the forward pass calls (DDP / compiled / engine)
        self.backbone_opt: Any = None

    # ------------------------------------------------------------------ hooks
    def autocast(self) -> ContextManager:
        return contextlib.nullcontext()

    def input_dtype(self) -> Optional[torch.dtype]:
        return None

    def micro_context(self, last: bool) -> ContextManager:
        return contextlib.nullcontext()

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        raise NotImplementedError

    def _skip_backward(self, last: bool) -> None:
        """A micro-batch whose loss is not finite under nan_policy=skip."""
        raise NotImplementedError

    def _apply(self) -> Optional[float]:
        """Step both optimizers at the accumulation boundary; returns the grad norm."""
        raise NotImplementedError

    def _skip_apply(self) -> None:
        """Close an accumulation window without changing any weight."""
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        """What goes into trainer.pt besides the backbone weights (optimizer, scaler)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any], ckpt_dir, same_world: bool) -> None:
        pass

    def save_extra(self, ckpt_dir) -> None:
        """Collective: engine-owned files in the checkpoint folder (every rank)."""

    def loss_scale(self) -> Optional[float]:
        return None

    # ------------------------------------------------------------- the step
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dt = self.input_dtype()
        if dt is not None:
            images = images.to(dt)
        with self.autocast():
            emb = self.model(images)
        if self.d.world_size > 1 and emb.requires_grad:
            # The head gives d(global mean loss)/d(local rows); DDP and DeepSpeed AVERAGE
            # backbone gradients over ranks while the true gradient is their SUM: scale by R
            # on the backbone path only (docs/design.md, gradient rules).
            ws = self.d.world_size
            emb.register_hook(lambda g: g * ws)
        return emb

    def train_step(self, next_batch: Callable[[], Batch], nan_policy: str, step: int) -> StepOutput:
        """One optimizer step over ``grad_accum`` micro-batches (``step`` is 1-based, for messages)."""
        out = StepOutput(ok=True)
        for k in range(self.accum):
            last = k == self.accum - 1
            images, labels = next_batch()
            out.images = images
            with self.micro_context(last):
                loss = self.head(self.forward(images), labels)
                lv = float(loss.detach())
                if math.isfinite(lv) and out.ok:
                    out.losses.append(lv)
                    self._backward(loss, last)
                    continue
                if nan_policy == "stop":
                    raise NonFiniteLossError(
                        f"non-finite loss ({lv}) at step {step}: stopping (nan_policy=stop); "
                        "check lr, data and precision, or resume from the last checkpoint")
                out.ok = False
                self._skip_backward(last)
        if not out.ok:
            self._skip_apply()
            return out
        out.grad_norm = self._apply()
        return out

    # ---------------------------------------------------------------- export
    def float_backbone(self) -> nn.Module:
        """The backbone in float32 (a copy when the engine keeps it in bf16/fp16)."""
        if all(p.dtype == torch.float32 for p in self.backbone.parameters()):
            return self.backbone
        return copy.deepcopy(self.backbone).float()

    def export_state_dict(self) -> Dict[str, torch.Tensor]:
        """Backbone state_dict in float32 on the CPU (insightface format: plain module keys)."""
        return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
                for k, v in self.backbone.state_dict().items()}

    def grad_norm_and_clip(self) -> float:
        params = [p for p in self.backbone.parameters() if p.grad is not None]
        if self.optim_cfg.clip_grad_norm > 0:
            return float(nn.utils.clip_grad_norm_(params, self.optim_cfg.clip_grad_norm))
        return float(torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in params])))
