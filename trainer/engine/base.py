"""The engine interface and the one training step both engines share."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Optional, Tuple, Union, cast

import torch
from torch import nn

from trainer.batchnorm import bn_modules, set_bn_training
from trainer.runtime.process_group import DistInfo

Batch = Tuple[torch.Tensor, torch.Tensor]
#: builds the backbone optimizer over a module's trainable parameters; ``fused=False`` where
#: the engine steps it through a wrapper (DeepSpeed). trainer.optim.optimizer_factory makes one.
OptimizerFactory = Callable[..., torch.optim.Optimizer]
#: a checkpoint folder
CkptDir = Union[str, Path]


# torch's Tensor.backward, Optimizer.step and torch.compile are not fully annotated (parts
# Unknown to a type checker): the engines call them through these typed doors.
def backward(loss: torch.Tensor) -> None:
    loss.backward()  # pyright: ignore[reportUnknownMemberType]


def step(opt: torch.optim.Optimizer) -> None:
    opt.step()  # pyright: ignore[reportUnknownMemberType]


def compiled(module: nn.Module) -> nn.Module:
    """``torch.compile(module)``: a module that runs the compiled forward."""
    return cast(Callable[[nn.Module], nn.Module], torch.compile)(module)  # pyright: ignore[reportUnknownMemberType]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; training stopped instead of training on."""


class LossScaleError(NonFiniteLossError):
    """fp16: the loss scale collapsed (below ``engine.min_scale``) or overflowed
    ``engine.max_overflows`` steps in a row; names the step and the scale."""


@dataclass
class StepOutput:
    """Device tensors (no host sync in the step): read them at logging steps only."""
    loss: torch.Tensor                        # mean micro-batch loss (NaN/inf when skipped)
    skipped: torch.Tensor                     # bool: the step was not applied, no weight changed
    grad_norm: Optional[torch.Tensor] = None  # backbone gradient norm before clipping
    images: Optional[torch.Tensor] = None     # the last micro-batch (for the image grid)
    # fp16: bool, the skip is a loss-scale overflow (finite loss, scaled gradients not finite):
    # GradScaler's normal event, not a NaN for run.nan_policy; None: no loss scaling
    overflow: Optional[torch.Tensor] = None
    loss_scale: Optional[torch.Tensor] = None  # fp16: the scale after this step (float32)


class Engine:
    """Wraps the backbone for training; owns its optimizer, precision and (loss) scaling.

    Subclasses implement the hooks (``autocast``, ``input_dtype``, ``micro_context``,
    ``_backward``, ``_apply``, state); :meth:`train_step` is the same for every engine.
    """

    name = "base"

    def __init__(self, clip_grad_norm: float, backbone: nn.Module, head: nn.Module, head_opt: torch.optim.Optimizer,
                 d: DistInfo, grad_accum: int, precision: str) -> None:
        self.clip_grad_norm = clip_grad_norm  # backbone gradient norm bound; 0: no clipping
        self.backbone = backbone          # the plain module (state_dict in insightface format)
        self.head = head
        self.head_opt = head_opt
        self.d = d
        self.accum = grad_accum
        self.precision = precision
        self.model: nn.Module = backbone  # what the forward pass calls (DDP / compiled / engine)
        self.backbone_opt: Any = None
        # fine-tuning switches, host-side flags set by the trainer (no device work):
        # backbone_frozen: the forward pass runs without gradient and with BatchNorm in eval
        # mode, so the backbone's weights, optimizer state and running statistics stay
        # bit-identical (optim.freeze_backbone_steps); bn_frozen: BatchNorm always in eval
        # mode, affine parameters still train (model.bn_mode=frozen)
        self.backbone_frozen = False
        self.bn_frozen = False
        self._bns = bn_modules(backbone)

    # ------------------------------------------------------------------ hooks
    def autocast(self) -> ContextManager[Any]:
        return contextlib.nullcontext()

    def input_dtype(self) -> Optional[torch.dtype]:
        return None

    def micro_context(self, last: bool) -> ContextManager[Any]:
        return contextlib.nullcontext()

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        raise NotImplementedError

    def _apply(self, bad: torch.Tensor) -> Tuple[Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
        """At the accumulation boundary: step both optimizers unless ``bad`` (device bool) or a
        gradient is not finite, decided on the device; returns (grad norm, skipped, overflow),
        overflow (fp16 only, else None): skipped with a finite loss, the loss scaler's event."""
        raise NotImplementedError

    def loss_scale_tensor(self) -> Optional[torch.Tensor]:
        """fp16: the current loss scale as a float32 tensor, read without a host sync."""
        return None

    # state, for the checkpointer (trainer.checkpointer.Stateful): the backbone's weights
    # (insightface keys) and what the engine adds (optimizer, scaler) go into trainer.pt
    def state_dict(self) -> Dict[str, Any]:
        return {"backbone": self.backbone.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.backbone.load_state_dict(state["backbone"])

    def save_files(self, ckpt_dir: CkptDir) -> None:
        """Collective: engine-owned files in the checkpoint folder (every rank)."""

    def check_files(self, ckpt_dir: CkptDir, same_world: bool) -> None:
        """Before a checkpoint is chosen: raise if the engine's own files in it are unusable."""

    def load_files(self, ckpt_dir: CkptDir, same_world: bool) -> None:
        """After :meth:`load_state_dict`: the engine's own files, if any."""

    def loss_scale(self) -> Optional[float]:
        return None

    # ------------------------------------------------------------- the step
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dt = self.input_dtype()
        if dt is not None:
            images = images.to(dt)
        frozen = self.backbone_frozen
        set_bn_training(self._bns, self.model.training and not (frozen or self.bn_frozen))
        with self.autocast(), (torch.no_grad() if frozen else contextlib.nullcontext()):
            emb = self.model(images)
        if self.d.world_size > 1 and emb.requires_grad:
            # The head gives d(global mean loss)/d(local rows); DDP and DeepSpeed AVERAGE
            # backbone gradients over ranks while the true gradient is their SUM: scale by R
            # on the backbone path only (docs/design.md, gradient rules).
            ws = self.d.world_size

            def sum_over_ranks(g: torch.Tensor) -> torch.Tensor:
                return g * ws

            emb.register_hook(sum_over_ranks)
        return emb

    def train_step(self, next_batch: Callable[[], Batch]) -> StepOutput:
        """One optimizer step over ``grad_accum`` micro-batches, without a host sync (DDP engine):
        a non-finite loss or gradient skips the step on the device (weights and optimizer
        state unchanged, as GradScaler does); the trainer reads ``skipped`` / ``overflow`` at
        logging steps (an fp16 overflow is counted, a non-finite loss meets ``run.nan_policy``)."""
        total: Optional[torch.Tensor] = None
        images: Optional[torch.Tensor] = None
        # running statistics (BatchNorm) move in the forward pass: keep a copy to restore
        # them on the device if the step is skipped (a few small tensors per step)
        stats = [b for b in self.backbone.buffers() if b.is_floating_point()]
        saved = [b.detach().clone() for b in stats]
        for k in range(self.accum):
            last = k == self.accum - 1
            images, labels = next_batch()
            with self.micro_context(last):
                loss = self.head(self.forward(images), labels)
                total = loss.detach() if total is None else total + loss.detach()
                self._backward(loss, last)
        assert total is not None  # grad_accum >= 1 (EngineConfig)
        mean = total / self.accum
        grad_norm, skipped, overflow = self._apply(~torch.isfinite(mean))
        with torch.no_grad():
            for b, old in zip(stats, saved):
                b.copy_(torch.where(skipped, old, b))
        return StepOutput(loss=mean, skipped=skipped, grad_norm=grad_norm, images=images, overflow=overflow,
                          loss_scale=self.loss_scale_tensor())

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

    def grad_norm_and_clip(self) -> torch.Tensor:
        """Backbone gradient norm before clipping (a device tensor; clipping needs no sync)."""
        params = [p for p in self.backbone.parameters() if p.grad is not None]
        if not params:  # backbone frozen this step: nothing to clip
            return torch.zeros((), device=self.d.device)
        if self.clip_grad_norm > 0:
            return nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        norms = [_vector_norm(g.detach().float()) for g in (p.grad for p in params) if g is not None]
        return _vector_norm(torch.stack(norms))


def _vector_norm(x: torch.Tensor) -> torch.Tensor:
    """The 2-norm of all of ``x`` (torch.linalg's function is not annotated)."""
    return cast(torch.Tensor, torch.linalg.vector_norm(x))  # pyright: ignore[reportUnknownMemberType]
