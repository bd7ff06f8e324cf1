"""DeepSpeed engine (ZeRO 0/1/2) for the backbone; the Partial FC shard stays outside.

DeepSpeed scales the loss by 1/grad_accum in ``engine.backward`` (the head's
gradients too) and steps its optimizer at the accumulation boundary; the head's
optimizer is stepped at that same boundary, before ``engine.step()``.
A non-finite loss: that micro-batch back-propagates a zero loss instead (DeepSpeed's
counters and gradient hooks stay consistent) and the boundary step runs with
learning rate 0 (weights unchanged; SGD momentum / Adam moments see one zero
gradient); the head's step is skipped. Deciding that costs a host sync per
micro-batch, as DeepSpeed's own step (overflow checks, gradient norm) does anyway:
the sync-free step is the DDP engine's.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, cast

import torch
import torch.distributed as dist
from torch import nn

from trainer.engine.base import CkptDir, Engine, OptimizerFactory, compiled
from trainer.engine.config import EngineConfig
from trainer.runtime.process_group import DistInfo

log = __import__("logging").getLogger("trainer")


def _skip_shm_build() -> None:
    # The CPU accelerator JIT-compiles a shared-memory all-reduce op (40-110 s) that
    # only inference all-reduce uses; training needs plain gloo collectives.
    import deepspeed.comm.torch as ds_torch_comm  # pyright: ignore[reportMissingTypeStubs]

    if hasattr(ds_torch_comm, "build_shm_op"):
        ds_torch_comm.build_shm_op = lambda: None


#: the classes DeepSpeed's own checkpoint files hold besides tensors and plain values
#: (ZeRO 1/2, fp32/bf16/fp16); data holders whose unpickling calls no other code
DEEPSPEED_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address", "deepspeed.runtime.zero.config.ZeroStageEnum",
})


def check_deepspeed_files(ds_dir: Path) -> None:
    """DeepSpeed loads its files with ``torch.load(weights_only=False)``; refuse one that names any
    global outside :data:`DEEPSPEED_GLOBALS` (read from the pickle's opcodes, nothing is executed)."""
    from trainer.checkpoint import UnsafeCheckpointError

    for f in sorted(Path(ds_dir).rglob("*.pt")):
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(f))
        except Exception as e:  # not a torch zip file: DeepSpeed's loader would fail on it too
            raise ValueError(f"{f}: unreadable DeepSpeed checkpoint file: {e}") from e
        bad = sorted(set(names) - DEEPSPEED_GLOBALS)
        if bad:
            raise UnsafeCheckpointError(f"{f}: refused to load: it names {', '.join(bad)}, which is not part of a "
                                        "DeepSpeed checkpoint; loading it would run code")


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, cfg: EngineConfig, make_optimizer: OptimizerFactory, clip_grad_norm: float,
                 backbone: nn.Module, head: nn.Module, head_opt: torch.optim.Optimizer, d: DistInfo,
                 grad_accum: int, precision: str, batch_size: int, compile: bool = False) -> None:
        super().__init__(clip_grad_norm, backbone, head, head_opt, d, grad_accum, precision)
        if d.device.type == "cpu":
            _skip_shm_build()
        import deepspeed as deepspeed_module  # pyright: ignore[reportMissingTypeStubs]

        # DeepSpeed ships no type information: its API is Any here, checked by the tests instead
        deepspeed: Any = deepspeed_module
        for k, v in (("LOCAL_RANK", d.local_rank), ("RANK", d.rank), ("WORLD_SIZE", d.world_size)):
            os.environ.setdefault(k, str(v))  # DeepSpeed asserts these even for one process
        backend = "nccl" if d.device.type == "cuda" else "gloo"
        if not dist.is_initialized():  # single process: DeepSpeed still wants a group
            store = tempfile.mkdtemp(prefix="ds_store_")
            dist.init_process_group(backend, init_method=f"file://{store}/store", rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend=backend)
        z = cfg.deepspeed
        ds_cfg: Dict[str, Any] = {
            "train_micro_batch_size_per_gpu": batch_size,
            "gradient_accumulation_steps": grad_accum,
            "zero_optimization": {"stage": z.zero_stage, "overlap_comm": z.overlap_comm,
                                  "contiguous_gradients": z.contiguous_gradients,
                                  "reduce_bucket_size": z.reduce_bucket_size,
                                  "allgather_bucket_size": z.allgather_bucket_size},
            "zero_allow_untested_optimizer": True,  # our SGD/AdamW are torch optimizers (no JIT build)
            "gradient_clipping": clip_grad_norm,
            "steps_per_print": 1 << 30,
            "bf16": {"enabled": precision == "bf16"},
            "fp16": {"enabled": precision == "fp16"},
        }
        if precision == "fp16":
            # DeepSpeed's dynamic loss scaler set like the DDP engine's GradScaler (halve on every
            # overflow, double after growth_interval clean steps). Its floor (an integer) stops the
            # scale at engine.min_scale, so there engine.max_overflows in a row is what gives up.
            ds_cfg["fp16"].update({"loss_scale": 0, "hysteresis": 1, "loss_scale_window": cfg.growth_interval,
                                   "initial_scale_power": max(0, round(math.log2(cfg.init_scale))),
                                   "min_loss_scale": max(1, int(cfg.min_scale))})
        fwd = compiled(backbone) if compile else backbone
        engine, ds_opt, _, _ = deepspeed.initialize(
            model=fwd, optimizer=make_optimizer(backbone, fused=False), config=ds_cfg
        )
        self.ds: Any = engine
        self.model = engine
        self._bad = False  # a non-finite micro-batch loss since the last boundary
        self.backbone_opt = ds_opt
        self._dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        if self._dtype is not None:
            # DeepSpeed casts parameters but not BatchNorm running stats; the CPU BN
            # kernel wants one dtype, so bring float buffers along.
            for b in backbone.buffers():
                if b.is_floating_point():
                    b.data = b.data.to(self._dtype)

    def input_dtype(self) -> Optional[torch.dtype]:
        return self._dtype

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        if not bool(torch.isfinite(loss)):  # host sync (see the module docstring)
            self._bad = True
            loss = cast(torch.Tensor, sum(p.reshape(-1)[0] * 0.0 for p in self.backbone.parameters()
                                          if p.requires_grad))
        self.ds.backward(loss)
        if not last:
            self.ds.step()  # not a boundary: DeepSpeed only advances its micro-step counter

    def _apply(self, bad: torch.Tensor) -> Tuple[Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
        # every non-finite micro-batch loss was seen (and replaced) in _backward, so ``bad``
        # (the mean loss not finite) adds nothing: no second host read
        skip, self._bad = self._bad, False
        if not skip:
            self.head_opt.step()
        self.head_opt.zero_grad(set_to_none=True)
        groups = self.backbone_opt.param_groups
        saved = [g["lr"] for g in groups]
        if skip:
            for g in groups:
                g["lr"] = 0.0
        try:
            self.ds.step()
        finally:
            for g, lr in zip(groups, saved):
                g["lr"] = lr
        gn = self.ds.get_global_grad_norm()
        dev = self.d.device
        overflow = None
        if self.precision == "fp16":  # DeepSpeed skipped its step on a loss-scale overflow
            ov = bool(getattr(self.ds.optimizer, "overflow", False)) and not skip
            overflow, skip = torch.tensor(ov, device=dev), skip or ov
        return (
            (None if gn is None else torch.as_tensor(float(gn), device=dev)),
            torch.tensor(skip, device=dev),
            overflow,
        )

    def loss_scale_tensor(self) -> Optional[torch.Tensor]:
        scale = self.loss_scale()
        return None if scale is None else torch.tensor(scale, dtype=torch.float32, device=self.d.device)

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "optimizer": None, "scaler": None}  # DeepSpeed saves its own (save_files)

    def save_files(self, ckpt_dir: CkptDir) -> None:
        self.ds.save_checkpoint(str(Path(ckpt_dir) / "deepspeed"), tag="ds")

    def check_files(self, ckpt_dir: CkptDir, same_world: bool) -> None:
        """Before a checkpoint is chosen: the DeepSpeed files :meth:`load_files` would read
        pass :func:`check_deepspeed_files`; a refused one makes the checkpoint unloadable, so
        resume falls back to the previous one (trainer.checkpoint.try_load)."""
        ds_dir = Path(ckpt_dir) / "deepspeed"
        if same_world and ds_dir.is_dir():
            check_deepspeed_files(ds_dir)

    def load_files(self, ckpt_dir: CkptDir, same_world: bool) -> None:
        """After the backbone's weights (:meth:`load_state_dict`): DeepSpeed's own state."""
        ds_dir = Path(ckpt_dir) / "deepspeed"
        if same_world and ds_dir.is_dir():
            check_deepspeed_files(ds_dir)  # DeepSpeed unpickles with weights_only=False
            self.ds.load_checkpoint(str(ds_dir), tag="ds", load_optimizer_states=True,
                                    load_lr_scheduler_states=False)
        else:
            log.warning("DeepSpeed optimizer state not restored (world size changed or no "
                        "deepspeed/ folder); weights, head shards and schedule are")

    def loss_scale(self) -> Optional[float]:
        if self.precision != "fp16":
            return None
        opt: Any = self.ds.optimizer
        cfg = getattr(opt, "loss_scale_config", None)
        scale = getattr(cfg, "cur_scale", None) if cfg is not None else getattr(opt, "cur_scale", None)
        return None if scale is None else float(scale)
