"""DDP engine: torch DistributedDataParallel (one process: the plain module), autocast
for bf16/fp16, ``torch.amp.GradScaler`` for fp16 over both optimizers."""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Dict, Optional, Tuple

import torch
from torch import nn

from trainer.engine.base import Engine, OptimizerFactory, backward, compiled, step
from trainer.engine.config import EngineConfig
from trainer.runtime.process_group import DistInfo


def _grads_finite(opt: torch.optim.Optimizer) -> torch.Tensor:
    """Device bool: every gradient of ``opt`` is finite (sparse: its values)."""
    ok = torch.ones((), dtype=torch.bool)
    for group in opt.param_groups:
        for p in group["params"]:
            g = p.grad
            if g is not None:
                ok = ok.to(g.device) & torch.isfinite(g._values() if g.is_sparse else g).all()
    return ok


class DDPEngine(Engine):
    name = "ddp"

    def __init__(self, cfg: EngineConfig, make_optimizer: OptimizerFactory, clip_grad_norm: float,
                 backbone: nn.Module, head: nn.Module, head_opt: torch.optim.Optimizer, d: DistInfo,
                 grad_accum: int, precision: str, compile: bool = False) -> None:
        super().__init__(clip_grad_norm, backbone, head, head_opt, d, grad_accum, precision)
        self.backbone_opt = make_optimizer(backbone, fused=True)
        fwd = compiled(backbone) if compile else backbone
        if d.world_size > 1:
            fwd = nn.parallel.DistributedDataParallel(
                fwd, device_ids=[d.device.index] if d.device.type == "cuda" else None)
        self.model = fwd
        self.scaler = torch.amp.GradScaler(d.device.type, init_scale=cfg.init_scale,
                                           growth_interval=cfg.growth_interval) if precision == "fp16" else None

    def autocast(self) -> ContextManager[Any]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.d.device.type, dtype=dtype)

    def micro_context(self, last: bool) -> ContextManager[Any]:
        if not last and isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        scaled = loss / self.accum
        backward(self.scaler.scale(scaled) if self.scaler is not None else scaled)

    def _apply(self, bad: torch.Tensor) -> Tuple[Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
        if self.scaler is not None:
            self.scaler.unscale_(self.backbone_opt)
            self.scaler.unscale_(self.head_opt)
        gn = self.grad_norm_and_clip()
        # a non-finite loss or gradient anywhere skips BOTH optimizers, on the device
        grads_bad = ~torch.isfinite(gn) | ~_grads_finite(self.head_opt)
        skipped = bad | grads_bad
        # fp16: non-finite scaled gradients with a finite loss are the scaler's overflow (it lowers
        # the scale below); without a scaler nothing explains them: a NaN for run.nan_policy
        overflow = grads_bad & ~bad if self.scaler is not None else None
        found = skipped.to(torch.float32)
        for opt in (self.backbone_opt, self.head_opt):
            if getattr(opt, "_step_supports_amp_scaling", False):
                # torch's fused optimizers read these two attributes (set by GradScaler.step)
                amp: Any = opt
                amp.grad_scale, amp.found_inf = None, found  # grads are already unscaled
                step(opt)
                amp.grad_scale = amp.found_inf = None
            elif not bool(skipped):  # an optimizer without device-side skipping: one sync
                step(opt)
        if self.scaler is not None:
            self.scaler.update()  # lowers the scale after an overflow, on the device
        self.backbone_opt.zero_grad(set_to_none=True)
        self.head_opt.zero_grad(set_to_none=True)
        return gn, skipped, overflow

    def loss_scale_tensor(self) -> Optional[torch.Tensor]:
        if self.scaler is None:
            return None
        # a copy (update() changes the scale in place); _get_scale_async: no host sync (torch >= 2.0)
        scale = self.scaler._get_scale_async()  # pyright: ignore[reportPrivateUsage]
        assert scale is not None  # set at the first scale() of a step
        return scale.detach().float().clone()

    def loss_scale(self) -> Optional[float]:
        """The GradScaler's scale (a host sync: call it at logging steps)."""
        return float(self.scaler.get_scale()) if self.scaler is not None else None

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "optimizer": self.backbone_opt.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("optimizer") is not None:
            self.backbone_opt.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
