"""DDP engine: torch DistributedDataParallel (one process: the plain module), autocast
for bf16/fp16, ``torch.amp.GradScaler`` for fp16 over both optimizers."""
from __future__ import annotations

import contextlib
import math
from typing import Any, ContextManager, Dict, Optional

import torch
from torch import nn

from trainer.config import EngineConfig, OptimConfig
from trainer.distributed import DistInfo
from trainer.engine.base import Engine
from trainer.optim import build_backbone_optimizer


def _grads_finite(opt: torch.optim.Optimizer) -> bool:
    for group in opt.param_groups:
        for p in group["params"]:
            g = p.grad
            if g is not None and not bool(torch.isfinite(g._values() if g.is_sparse else g).all()):
                return False
    return True


class DDPEngine(Engine):
    name = "ddp"

    def __init__(self, cfg: EngineConfig, optim: OptimConfig, backbone: nn.Module, head, head_opt,
                 d: DistInfo, grad_accum: int, precision: str, compile: bool = False) -> None:
        super().__init__(optim, backbone, head, head_opt, d, grad_accum, precision)
        self.backbone_opt = build_backbone_optimizer(backbone, optim)
        fwd: nn.Module = torch.compile(backbone) if compile else backbone
        if d.world_size > 1:
            fwd = nn.parallel.DistributedDataParallel(
                fwd, device_ids=[d.device.index] if d.device.type == "cuda" else None)
        self.model = fwd
        self.scaler = torch.amp.GradScaler(d.device.type) if precision == "fp16" else None

    def autocast(self) -> ContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.d.device.type, dtype=dtype)

    def micro_context(self, last: bool) -> ContextManager:
        if not last and isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        scaled = loss / self.accum
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()

    def _skip_backward(self, last: bool) -> None:
        pass

    def _zero(self) -> None:
        self.backbone_opt.zero_grad(set_to_none=True)
        self.head_opt.zero_grad(set_to_none=True)

    def _skip_apply(self) -> None:
        self._zero()

    def _apply(self) -> Optional[float]:
        if self.scaler is not None:
            self.scaler.unscale_(self.backbone_opt)
            self.scaler.unscale_(self.head_opt)
        gn = self.grad_norm_and_clip()
        if self.scaler is not None:
            # An inf/NaN gradient anywhere skips BOTH optimizers (GradScaler alone would
            # decide per optimizer); update() then lowers the scale.
            if math.isfinite(gn) and _grads_finite(self.head_opt):
                self.backbone_opt.step()
                self.head_opt.step()
            self.scaler.update()
        else:
            self.backbone_opt.step()
            self.head_opt.step()
        self._zero()
        return gn

    def loss_scale(self) -> Optional[float]:
        return float(self.scaler.get_scale()) if self.scaler is not None else None

    def state_dict(self) -> Dict[str, Any]:
        return {"optimizer": self.backbone_opt.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: Dict[str, Any], ckpt_dir, same_world: bool) -> None:
        if state.get("optimizer") is not None:
            self.backbone_opt.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
