"""Training entry point: ``python -m trainer.train CONFIG [key=value ...]`` (or under torchrun).

One process without torchrun; with torchrun every rank joins the process group
(NCCL on CUDA, gloo on CPU) and takes its device from LOCAL_RANK. The backbone
runs under DDP (default) or a DeepSpeed engine; the Partial FC shard always
stays outside with its own optimizer (DESIGN.md §2). Nothing runs at import.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from trainer import checkpoint as ckpt_mod
from trainer.backbones import get_backbone
from trainer.config import Config, ConfigError, load_config, to_dict, to_yaml
from trainer.distributed import DistInfo, barrier, init_distributed
from trainer.monitor import Monitor, setup_logging
from trainer.optim import LRScheduler, build_backbone_optimizer
from trainer.utils.atomic import atomic_open, atomic_torch_save

log = logging.getLogger("trainer")

LoaderFactory = Callable[[Config, DistInfo], Any]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; training stopped instead of training on."""


def default_loader_factory(cfg: Config, d: DistInfo):
    from trainer.data import build_train_loader

    if not cfg.data.train_dir:
        raise ConfigError("config key 'data.train_dir' is empty: set it to the dataset folder")
    return build_train_loader(cfg.data.train_dir, cfg.data.batch_size, rank=d.rank,
                              world_size=d.world_size, device=d.device, backend=cfg.data.backend,
                              num_threads=cfg.data.num_threads, seed=cfg.seed,
                              augment=cfg.data.augment, shuffle=True)


def build_margin(cfg: Config):
    from trainer.heads import ArcFace, CombinedMargin, CosFace

    lc = cfg.loss
    if lc.margin == "arcface":
        return ArcFace(s=lc.s, m=lc.m)
    if lc.margin == "cosface":
        return CosFace(s=lc.s, m=lc.m)
    if lc.margin == "adaface":
        from trainer.heads import AdaFace

        return AdaFace(s=lc.s, m=lc.m, h=lc.h, t_alpha=lc.t_alpha)
    if lc.margin == "magface":
        from trainer.heads import MagFace

        return MagFace(s=lc.s, l_a=lc.l_a, u_a=lc.u_a, l_m=lc.l_m, u_m=lc.u_m, lambda_g=lc.lambda_g)
    if lc.margin == "curricularface":
        from trainer.heads import CurricularFace

        return CurricularFace(s=lc.s, m=lc.m)
    m1, m2, m3 = lc.margin_list
    return CombinedMargin(s=lc.s, m1=m1, m2=m2, m3=m3)


def _resolve_precision(cfg: Config, device: torch.device) -> str:
    p = cfg.precision
    if p == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if p == "fp16" and device.type != "cuda":
        raise ConfigError("precision=fp16 needs CUDA; use precision=bf16 (or fp32) on CPU")
    return p


def _all_ok(ok: bool) -> bool:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([1 if ok else 0], dtype=torch.int32)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())
    return ok


class Trainer:
    """Builds everything from a Config and trains; attributes are public for tests."""

    def __init__(self, cfg: Config, loader_factory: Optional[LoaderFactory] = None) -> None:
        self.cfg = cfg
        self.loader_factory = loader_factory or default_loader_factory
        self.history: List[Dict[str, float]] = []   # per optimizer step: step, loss
        self.val_history: List[Dict[str, Any]] = []  # step, {name: acc}

    # ------------------------------------------------------------------ setup
    def setup(self) -> "Trainer":
        cfg = self.cfg
        self.d = d = init_distributed()
        self.out = Path(cfg.output)
        if d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        barrier()
        setup_logging(self.out, d.rank)
        if d.is_main:
            with atomic_open(self.out / "config.yaml", "w") as f:
                f.write(to_yaml(cfg))
            log.info("resolved config (saved to %s):\n%s", self.out / "config.yaml", to_yaml(cfg))
        self.precision = _resolve_precision(cfg, d.device)
        # Same backbone init on every rank; per-rank streams for everything else.
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed + d.rank)
        np.random.seed((cfg.seed + d.rank) % 2**32)

        self.loader = self.loader_factory(cfg, d)
        self.num_classes = int(self.loader.num_classes)
        log.info("data: %s, %d images, %d classes, %d batches of %d per rank per epoch",
                 type(self.loader).__name__, int(self.loader.num_images), self.num_classes,
                 len(self.loader), cfg.data.batch_size)
        if len(self.loader) == 0:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} x {d.world_size} ranks is larger than "
                              f"the dataset ({self.loader.num_images} images): no full batch per epoch")
        if cfg.data.num_classes is not None and cfg.data.num_classes != self.num_classes:
            raise ConfigError(f"config key 'data.num_classes' = {cfg.data.num_classes} but the dataset "
                              f"{cfg.data.train_dir} has {self.num_classes} classes")

        kw = dict(cfg.model.backbone_kwargs)
        if cfg.model.dropout:
            kw["dropout"] = cfg.model.dropout
        if cfg.model.grad_checkpointing:
            kw["grad_checkpointing"] = True
        try:
            backbone = get_backbone(cfg.model.backbone, num_features=cfg.model.embedding_size, **kw)
        except TypeError as e:
            raise ConfigError(f"model.backbone={cfg.model.backbone}: unsupported option ({e})") from e
        self.backbone = backbone.to(d.device)
        torch.manual_seed(cfg.seed + 1 + d.rank)

        from trainer.heads import UNPG, PartialFC, PartialFCSGD

        self.head = PartialFC(margin=build_margin(cfg), embedding_size=cfg.model.embedding_size,
                              num_classes=self.num_classes, sample_rate=cfg.loss.sample_rate,
                              unpg=UNPG(wisk=cfg.loss.wisk, negatives=cfg.loss.negatives) if cfg.loss.unpg else None,
                              device=d.device)
        oc = cfg.optim
        self.head_lr = oc.head_lr if oc.head_lr is not None else oc.lr
        self.head_opt = PartialFCSGD(self.head, lr=self.head_lr, momentum=oc.momentum,
                                     weight_decay=oc.weight_decay)

        self.accum = oc.grad_accum
        self.steps_per_epoch = max(1, len(self.loader) // self.accum)
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.num_epochs * self.steps_per_epoch

        self.engine = None
        self.scaler = None
        fwd: nn.Module = self.backbone
        if cfg.model.compile:
            fwd = torch.compile(self.backbone)
        if cfg.engine == "deepspeed":
            self._setup_deepspeed(fwd)
        else:
            self.backbone_opt = build_backbone_optimizer(self.backbone, oc)
            if d.world_size > 1:
                fwd = nn.parallel.DistributedDataParallel(
                    fwd, device_ids=[d.device.index] if d.device.type == "cuda" else None)
            if self.precision == "fp16":
                self.scaler = torch.amp.GradScaler("cuda")
        self.model = fwd
        self.scheduler = LRScheduler([self.backbone_opt, self.head_opt], [oc.lr, self.head_lr],
                                     self.total_steps, oc)
        self.step = 0
        self.epoch = 0
        self.batch = 0  # micro-batches consumed in the current epoch
        self.ckpt_root = self.out / "checkpoints"
        self.verifier = None
        if cfg.data.val_targets:
            from trainer.verify import Verifier, resolve_targets

            paths = resolve_targets(cfg.data.val_dir, cfg.data.val_targets, cfg.data.train_dir)
            if d.is_main:
                self.verifier = Verifier(paths, device=d.device)
        self._resume()
        return self

    def _setup_deepspeed(self, fwd: nn.Module) -> None:
        cfg, d = self.cfg, self.d
        if d.device.type == "cpu":
            # The CPU accelerator JIT-compiles a shared-memory all-reduce op (40-110 s) that
            # only inference all-reduce uses; training needs plain gloo collectives.
            import deepspeed.comm.torch as ds_torch_comm

            if hasattr(ds_torch_comm, "build_shm_op"):
                ds_torch_comm.build_shm_op = lambda: None
        import deepspeed

        for k, v in (("LOCAL_RANK", d.local_rank), ("RANK", d.rank), ("WORLD_SIZE", d.world_size)):
            os.environ.setdefault(k, str(v))  # DeepSpeed asserts these even for one process
        if not dist.is_initialized():  # single process: DeepSpeed still wants a group
            store = tempfile.mkdtemp(prefix="ds_store_")
            dist.init_process_group("nccl" if d.device.type == "cuda" else "gloo",
                                    init_method=f"file://{store}/store", rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend="nccl" if d.device.type == "cuda" else "gloo")
        oc = cfg.optim
        ds_cfg: Dict[str, Any] = {
            "train_micro_batch_size_per_gpu": cfg.data.batch_size,
            "gradient_accumulation_steps": self.accum,
            "zero_optimization": {"stage": cfg.zero_stage},
            # our SGD/AdamW are torch optimizers (no FusedAdam JIT build)
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": oc.clip_grad_norm,
            "steps_per_print": 1 << 30,
            "bf16": {"enabled": self.precision == "bf16"},
            "fp16": {"enabled": self.precision == "fp16"},
        }
        for k, v in cfg.deepspeed.items():
            ds_cfg[k] = v
        base_opt = build_backbone_optimizer(self.backbone, oc)
        engine, ds_opt, _, _ = deepspeed.initialize(model=fwd, optimizer=base_opt, config=ds_cfg)
        self.engine = engine
        self.backbone_opt = ds_opt
        if self.precision in ("bf16", "fp16"):
            # DeepSpeed casts parameters but not BatchNorm running stats; the CPU BN
            # kernel wants one dtype, so bring float buffers along.
            dt = torch.bfloat16 if self.precision == "bf16" else torch.float16
            for b in self.backbone.buffers():
                if b.is_floating_point():
                    b.data = b.data.to(dt)
        self.ds_dtype = torch.bfloat16 if self.precision == "bf16" else (
            torch.float16 if self.precision == "fp16" else None)

    # ------------------------------------------------------------ checkpoints
    def _class_ranges(self, world_size: int) -> List[tuple]:
        from trainer.heads import class_range

        return [tuple(class_range(self.num_classes, r, world_size)) for r in range(world_size)]

    def save_checkpoint(self) -> Path:
        d = self.d
        path = ckpt_mod.checkpoint_dir(self.ckpt_root, self.step)
        if d.is_main:
            ckpt_mod.begin_save(path)
        barrier()
        if self.engine is not None:
            self.engine.save_checkpoint(str(path / "deepspeed"), tag="ds")
        ckpt_mod.write_shard(path, d.rank, {
            "class_range": tuple(self.head.class_range), "num_classes": self.num_classes,
            "head": self.head.state_dict(), "optimizer": self.head_opt.state_dict()})
        if d.is_main:
            state = {
                "backbone": self.backbone.state_dict(),
                "optimizer": self.backbone_opt.state_dict() if self.engine is None else None,
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "step": self.step, "epoch": self.epoch, "batch": self.batch,
                "world_size": d.world_size, "num_classes": self.num_classes,
                "best": dict(self.verifier.best) if self.verifier else {},
                "config": to_dict(self.cfg),
            }
            atomic_torch_save(state, path / "trainer.pt")
        barrier()
        if d.is_main:
            ckpt_mod.finish_save(path, self.step, d.world_size, self._class_ranges(d.world_size),
                                 self.cfg.keep_last)
            log.info("saved checkpoint %s", path)
        barrier()
        return path

    def _resume(self) -> None:
        d = self.d
        cands = ckpt_mod.find_resume_candidates(self.cfg.resume, self.ckpt_root)
        if not cands:
            return

        def load(p: Path):
            meta, state, shard = ckpt_mod.load_for_rank(p, d.rank, d.world_size, tuple(self.head.class_range))
            if state["num_classes"] != self.num_classes:
                raise ValueError(f"{p}: {state['num_classes']} classes, dataset has {self.num_classes}")
            return meta, state, shard

        path, res = ckpt_mod.try_load(cands, load, _all_ok)
        if path is None:
            if self.cfg.resume != "auto":
                raise RuntimeError(f"resume={self.cfg.resume}: checkpoint could not be loaded")
            log.warning("no loadable checkpoint in %s; starting from scratch", self.ckpt_root)
            return
        meta, state, shard = res
        same_world = meta["world_size"] == d.world_size
        self.backbone.load_state_dict(state["backbone"])
        if self.engine is not None:
            ds_dir = path / "deepspeed"
            if same_world and ds_dir.is_dir():
                self.engine.load_checkpoint(str(ds_dir), tag="ds", load_optimizer_states=True,
                                            load_lr_scheduler_states=False)
            else:
                log.warning("DeepSpeed optimizer state not restored (world size %d -> %d); "
                            "weights, head shards and schedule are", meta["world_size"], d.world_size)
        elif state.get("optimizer") is not None:
            self.backbone_opt.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.head.load_state_dict(shard["head"])
        self.head_opt.load_state_dict(shard["optimizer"])
        self.step, self.epoch, self.batch = int(state["step"]), int(state["epoch"]), int(state["batch"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.verifier is not None:
            self.verifier.best.update(state.get("best", {}))
        if same_world and "rng" in shard:
            ckpt_mod.set_rng_state(shard["rng"])
        else:
            torch.manual_seed(self.cfg.seed + 7919 * self.step + d.rank)
        log.info("resumed from %s (step %d, epoch %d, batch %d, world size %d -> %d)", path,
                 self.step, self.epoch, self.batch, meta["world_size"], d.world_size)

    # ----------------------------------------------------------------- train
    def _autocast(self):
        if self.engine is not None or self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.d.device.type, dtype=dtype)

    def _next_batch(self):
        while True:
            if self._it is None:
                self.loader.set_epoch(self.epoch, start_batch=self.batch)
                self._it = iter(self.loader)
            try:
                images, labels = next(self._it)
                self.batch += 1
                return images, labels
            except StopIteration:
                self.epoch += 1
                self.batch = 0
                self._it = None

    def _forward_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.engine is not None and self.ds_dtype is not None:
            images = images.to(self.ds_dtype)
        with self._autocast():
            emb = self.model(images)
        if self.d.world_size > 1 and emb.requires_grad:
            # The head's embedding gradient is d(global mean loss)/d(local rows); DDP /
            # DeepSpeed AVERAGE backbone grads over ranks while the true gradient is their
            # SUM, so scale by R on the backbone path only (DESIGN.md §2).
            ws = self.d.world_size
            emb.register_hook(lambda g: g * ws)
        return self.head(emb, labels)

    def _verify(self, monitor: Monitor) -> None:
        if self.verifier is not None:
            prev_best = dict(self.verifier.best)
            accs = self.verifier.run(self._float_backbone())
            self.val_history.append({"step": self.step, "acc": dict(accs)})
            if self.step > 0 and (not prev_best or
                                  sum(accs.values()) > sum(prev_best.get(k, 0.0) for k in accs)):
                # keep the best model by the sum of accuracies over the configured sets
                atomic_torch_save(self.export_state_dict(), self.out / "model_best.pt")
                log.info("new best verification at step %d: wrote %s", self.step, self.out / "model_best.pt")
            for name, acc in accs.items():
                monitor.scalars(self.step, {f"val/{name}": acc, f"val/{name}_best": self.verifier.best[name]})
                log.info("verification step %d %s accuracy %.4f (best %.4f)", self.step, name, acc,
                         self.verifier.best[name])
        barrier()

    def _float_backbone(self) -> nn.Module:
        """The backbone in float32 (a copy when DeepSpeed keeps it in bf16/fp16)."""
        if all(p.dtype == torch.float32 for p in self.backbone.parameters()):
            return self.backbone
        import copy

        return copy.deepcopy(self.backbone).float()

    def export_state_dict(self) -> Dict[str, torch.Tensor]:
        """Backbone state_dict in float32 (insightface format: plain module keys)."""
        return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
                for k, v in self.backbone.state_dict().items()}

    def train(self) -> Dict[str, Any]:
        cfg, d = self.cfg, self.d
        per_step = cfg.data.batch_size * d.world_size * self.accum
        monitor = Monitor(self.out, d.is_main, self.total_steps, self.step, per_step, cfg.progress_bar)
        self._it = None
        skips = 0
        try:
            if cfg.verify_at_start and self.step < self.total_steps:
                self._verify(monitor)
            self.model.train()
            while self.step < self.total_steps:
                grad_norm, ok, losses, last_images = self._one_step()
                if not ok:
                    skips += 1
                    if skips > cfg.max_skips:
                        raise NonFiniteLossError(
                            f"non-finite loss at step {self.step + 1}: {skips} steps skipped in a row "
                            f"(max_skips={cfg.max_skips}); stopping")
                    log.warning("non-finite loss at step %d: step skipped (nan_policy=skip)", self.step + 1)
                    continue
                skips = 0
                self.step += 1
                loss = float(np.mean(losses))
                lr = self.scheduler.get_lr()
                self.scheduler.step()
                record = {"step": self.step, "loss": loss}
                head_stats = getattr(self.head, "last_stats", {}) or {}
                if head_stats.get("neg_pairs"):
                    record["kept_fraction"] = head_stats["kept"] / head_stats["neg_pairs"]
                self.history.append(record)
                monitor.tick(self.step)
                if self.step == 1 and cfg.image_grid:
                    monitor.images(self.step, "train/input", last_images)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    sps = monitor.line(self.step, self.epoch, loss, lr)
                    vals = {"train/loss": loss, "train/lr": lr, "train/samples_per_s": sps}
                    if grad_norm is not None:
                        vals["train/grad_norm"] = grad_norm
                    if self.scaler is not None:
                        vals["train/loss_scale"] = float(self.scaler.get_scale())
                    stats = getattr(self.head, "last_stats", {}) or {}
                    vals.update({f"unpg/{k}": float(v) for k, v in stats.items() if isinstance(v, (int, float))})
                    monitor.scalars(self.step, vals)
                if cfg.hist_every and self.step % cfg.hist_every == 0:
                    sims = (getattr(self.head, "last_stats", {}) or {}).get("neg_sims")
                    if isinstance(sims, torch.Tensor):
                        monitor.histogram(self.step, "unpg/neg_sims", sims)
                t_side = time.time()
                if cfg.verify_every and self.step % cfg.verify_every == 0 and self.step < self.total_steps:
                    self._verify(monitor)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
                monitor.exclude(time.time() - t_side)
            if not self.val_history or self.val_history[-1]["step"] != self.step:
                self._verify(monitor)
            if not ckpt_mod.checkpoint_dir(self.ckpt_root, self.step).joinpath(ckpt_mod.MARKER).exists():
                self.save_checkpoint()
            if d.is_main:
                atomic_torch_save(self.export_state_dict(), self.out / "model.pt")
                log.info("wrote %s", self.out / "model.pt")
                self._write_summary()
            barrier()
        finally:
            monitor.close()
        return {"history": self.history, "val": self.val_history,
                "best": dict(self.verifier.best) if self.verifier else {}}

    def _write_summary(self) -> None:
        """<out>/summary.json: loss per step and every verification (rank 0)."""
        import json

        summary = {"steps": self.step, "world_size": self.d.world_size, "history": self.history,
                   "val": self.val_history, "best": dict(self.verifier.best) if self.verifier else {}}
        with atomic_open(self.out / "summary.json", "w") as f:
            json.dump(summary, f, indent=1)
        if len(self.val_history) >= 2:
            a, b = self.val_history[0], self.val_history[-1]
            for name in b["acc"]:
                log.info("verification %s: %.4f at step %d -> %.4f at step %d", name, a["acc"].get(name, float("nan")),
                         a["step"], b["acc"][name], b["step"])

    def _one_step(self):
        """One optimizer step over ``grad_accum`` micro-batches.
        Returns (grad_norm, ok, micro losses, last images)."""
        cfg = self.cfg
        losses: List[float] = []
        ok = True
        images = None
        if self.engine is not None:
            for k in range(self.accum):
                images, labels = self._next_batch()
                loss = self._forward_loss(images, labels)
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    raise NonFiniteLossError(f"non-finite loss ({lv}) at step {self.step + 1}: stopping "
                                             f"(nan_policy=stop); check lr, data and precision")
                losses.append(lv)
                self.engine.backward(loss)  # scales by 1/grad_accum (head grads too)
                if self.engine.is_gradient_accumulation_boundary():  # checked BEFORE engine.step()
                    self.head_opt.step()
                    self.head_opt.zero_grad(set_to_none=True)
                self.engine.step()
            gn = self.engine.get_global_grad_norm()
            return (float(gn) if gn is not None else None), True, losses, images

        ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
        for k in range(self.accum):
            images, labels = self._next_batch()
            sync = (k == self.accum - 1) or not ddp
            ctx = contextlib.nullcontext() if sync else self.model.no_sync()
            with ctx:
                loss = self._forward_loss(images, labels)
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    if cfg.nan_policy == "stop":
                        raise NonFiniteLossError(
                            f"non-finite loss ({lv}) at step {self.step + 1}: stopping (nan_policy=stop); "
                            "check lr, data and precision, or resume from the last checkpoint")
                    ok = False
                    continue
                losses.append(lv)
                scaled = loss / self.accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        if not ok:
            self.backbone_opt.zero_grad(set_to_none=True)
            self.head_opt.zero_grad(set_to_none=True)
            return None, False, losses, images
        if self.scaler is not None:
            self.scaler.unscale_(self.backbone_opt)
            self.scaler.unscale_(self.head_opt)
        params = [p for p in self.backbone.parameters() if p.grad is not None]
        if cfg.optim.clip_grad_norm > 0:
            gn = float(nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad_norm))
        else:
            gn = float(torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in params])))
        if self.scaler is not None:
            self.scaler.step(self.backbone_opt)
            self.scaler.step(self.head_opt)
            self.scaler.update()
        else:
            self.backbone_opt.step()
            self.head_opt.step()
        self.backbone_opt.zero_grad(set_to_none=True)
        self.head_opt.zero_grad(set_to_none=True)
        return gn, True, losses, images


def run(cfg: Config, loader_factory: Optional[LoaderFactory] = None) -> Dict[str, Any]:
    """Set up and train; returns the history (used by tests)."""
    return Trainer(cfg, loader_factory).setup().train()


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ + "\nusage: python -m trainer.train CONFIG.yaml [key.sub=value ...]")
        return 0 if argv else 2
    try:
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        run(cfg)
    except NonFiniteLossError as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 3
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
