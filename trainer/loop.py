"""The trainer: builds the components from the config sections and runs the loop.

Components (each owns one concern): the data loader (``trainer.data``), the
backbone (``trainer.backbones``), the Partial FC head and its optimizer
(``trainer.heads``), the engine (``trainer.engine``: DDP or DeepSpeed, precision,
the one step path), the LR schedule (``trainer.optim``), the checkpoint manager
(``trainer.checkpointer``), the validator (``trainer.validator``) and the monitor
(``trainer.monitor``). :meth:`Trainer.train` only sequences them.

Order of :meth:`Trainer.setup`, so that a refused run changes nothing: take the
run folder's lock (rank 0, :mod:`trainer.ownership`), move a previous run aside
(``resume: none``) or refuse a finished one, build the components, check the
data's class count, resume (checkpoint and configuration checks), and only then
write ``config.yaml``. :meth:`Trainer.train` stops on a preemption signal after
a checkpoint at the current step (:mod:`trainer.preemption`).
"""
from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from trainer import elastic
from trainer.backbones import get_backbone
from trainer.batchnorm import recalibrate
from trainer.checkpointer import CheckpointManager, Progress, is_restart
from trainer.config import Config, ConfigError, to_yaml
from trainer.data import to_model_input
from trainer.distributed import DistInfo, all_ok, barrier, init_distributed
from trainer.engine import LossScaleError, NonFiniteLossError, build_engine
from trainer.heads import STATE_DTYPES, UNPG, PartialFC, PartialFCSGD, build_margin
from trainer.imprint import FaceRecImages, imprint_head
from trainer.io.atomic import atomic_open, atomic_torch_save
from trainer.monitor import Monitor, setup_logging
from trainer.optim import LRScheduler, optimizer_factory
from trainer.ownership import RunLock, RunLockedError, die_with_parent, under_torchrun
from trainer.preemption import Preempted, PreemptionHandler
from trainer.pretrained import init_backbone
from trainer.validator import Validator

log = logging.getLogger("trainer")

LoaderFactory = Callable[[Config, DistInfo], Any]


def default_loader_factory(cfg: Config, d: DistInfo):
    from trainer.data import build_train_loader

    if not cfg.data.train_dir:
        raise ConfigError("config key 'data.train_dir' is empty: set it to the dataset folder")
    return build_train_loader(cfg.data.train_dir, cfg.data.batch_size, rank=d.rank,
                              world_size=d.world_size, device=d.device, backend=cfg.data.backend,
                              num_threads=cfg.data.num_threads, seed=cfg.run.seed,
                              augment=cfg.data.augment, shuffle=True, shuffle_mode=cfg.data.shuffle_mode,
                              block_bytes=cfg.data.block_bytes, shuffle_buffer=cfg.data.shuffle_buffer,
                              lock_timeout=cfg.data.lock_timeout)


def build_backbone(cfg: Config, device: torch.device) -> torch.nn.Module:
    m = cfg.model
    try:
        return get_backbone(m.backbone, num_features=m.embedding_size, dropout=m.dropout or None,
                            grad_checkpointing=m.grad_checkpointing or None, width=m.width,
                            norm=m.norm).to(device)
    except ValueError as e:
        raise ConfigError(f"model.backbone={m.backbone}: {e}") from e


def build_head(cfg: Config, num_classes: int, device: torch.device):
    lc, oc = cfg.loss, cfg.optim
    margin = build_margin(lc.margin, s=lc.s, m=lc.m, margin_list=tuple(lc.margin_list), h=lc.h,
                          t_alpha=lc.t_alpha, l_a=lc.l_a, u_a=lc.u_a, l_m=lc.l_m, u_m=lc.u_m, lambda_g=lc.lambda_g)
    head = PartialFC(margin=margin,
                     embedding_size=cfg.model.embedding_size, num_classes=num_classes,
                     sample_rate=lc.sample_rate,
                     unpg=UNPG(wisk=lc.wisk, negatives=lc.negatives, sharded=lc.unpg_sharded) if lc.unpg else None,
                     dtype=STATE_DTYPES[lc.state_dtype], device=device)
    head_lr = oc.head_lr if oc.head_lr is not None else oc.lr
    return head, PartialFCSGD(head, lr=head_lr, momentum=oc.momentum, weight_decay=oc.weight_decay), head_lr


class Trainer:
    """``Trainer(cfg).setup().train()``; the components are public attributes (tests use them)."""

    def __init__(self, cfg: Config, loader_factory: Optional[LoaderFactory] = None) -> None:
        self.cfg = cfg
        self.loader_factory = loader_factory or default_loader_factory
        self.history: List[Dict[str, float]] = []   # per optimizer step: step, loss

    # ------------------------------------------------------------------ setup
    def setup(self) -> Trainer:
        cfg = self.cfg
        if under_torchrun():
            die_with_parent()  # no orphan keeps training if the agent dies
        self.d = d = init_distributed()
        self.out = Path(cfg.run.output)
        self.lock: Optional[RunLock] = None
        self.preempt = PreemptionHandler(cfg.run.preempt_signals, d.device).install()
        try:
            self._on_main(self._take_folder, RunLockedError, "rank 0 could not lock the run folder")
            barrier()
            setup_logging(self.out, d.rank)
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _on_main(self, fn: Callable[[], Any], exc: type, other: str) -> None:
        """Run ``fn`` on rank 0; if it raises, every rank raises (the others: ``exc(other)``)."""
        err = None
        if self.d.is_main:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - re-raised below on every rank
                err = e
        if not all_ok(err is None):
            raise err if err is not None else exc(other)

    def _take_folder(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock = RunLock(self.out).acquire(wait_s=60.0 if is_restart() else 0.0)

    def _build(self) -> None:
        cfg, d = self.cfg, self.d
        self.checkpointer = None
        # Same backbone init on every rank; per-rank streams for everything else.
        torch.manual_seed(cfg.run.seed)
        random.seed(cfg.run.seed + d.rank)
        np.random.seed((cfg.run.seed + d.rank) % 2**32)

        self.loader = self._build_loader()
        self.backbone = build_backbone(cfg, d.device)
        # model.init_from: before the engine (DeepSpeed copies the weights into its optimizer),
        # and only for a run that starts at step 0 (a checkpoint wins; a changed init_from on
        # resume is a config-diff error, RESUME_KEYS)
        self.init_info = None
        if cfg.model.init_from and not self._will_resume():
            self.init_info = init_backbone(self.backbone, cfg.model.init_from, cfg.model.init_strict)
        torch.manual_seed(cfg.run.seed + 1 + d.rank)
        self.head, self.head_opt, head_lr = build_head(cfg, self.num_classes, d.device)
        # elastic hook: data.keep_global_batch derives the accumulation from the checkpoint's global batch
        resume_from = elastic.resume_candidates(cfg, self.out)
        self.accum, self.global_batch = elastic.grad_accum_for(cfg, d.world_size, resume_from)
        n = getattr(self.loader, "num_images", None)  # steps of the global batch: the same at any world size
        self.steps_per_epoch = max(1, int(n) // self.global_batch if n else len(self.loader) // self.accum)
        self.total_steps = (
            cfg.run.max_steps if cfg.run.max_steps is not None else cfg.run.num_epochs * self.steps_per_epoch
        )
        self.engine = build_engine(cfg.engine, optimizer_factory(cfg.optim), cfg.optim.clip_grad_norm, self.backbone,
                                   self.head, self.head_opt, d, self.accum, cfg.data.batch_size,
                                   compile=cfg.model.compile)
        self.precision = self.engine.precision
        self.engine.bn_frozen = cfg.model.bn_mode == "frozen"
        self.scheduler = LRScheduler([self.engine.backbone_opt, self.head_opt],
                                     [cfg.optim.lr * cfg.optim.backbone_lr_scale, head_lr],
                                     self.total_steps, cfg.optim)
        self.checkpointer = CheckpointManager(cfg.checkpoint, self.out, d, self.total_steps)
        from trainer.checkpointer import ResumeError

        self._on_main(self.checkpointer.prepare, ResumeError, "rank 0 refused the run folder")
        barrier()
        self.validator = Validator.build(cfg.validation, cfg.data.train_dir, d, self.out, self.total_steps)
        self.progress = Progress()
        resumed = self.checkpointer.resume(self.engine, self.head, self.head_opt, self.scheduler,
                                           self.num_classes, cfg.run.seed, config=cfg)
        if resumed is not None:
            self.progress = resumed.progress
            self.validator.best.update(resumed.best)
            self.history = list(resumed.history)
            # every rank: done_at() decides a collective validation
            self.validator.history = list(resumed.val_history)
        else:
            self._start_fine_tune()
        if d.is_main:  # only now: every check of this run has passed
            with atomic_open(self.out / "config.yaml", "w") as f:
                f.write(to_yaml(cfg))
            log.info("resolved config (saved to %s):\n%s", self.out / "config.yaml", to_yaml(cfg))
        barrier()

    def _will_resume(self) -> bool:
        """Whether setup will load a checkpoint (then it, not model.init_from, sets the weights)."""
        from trainer.checkpoint import CHECKPOINTS_DIR, find_resume_candidates

        try:
            return bool(find_resume_candidates(self.cfg.checkpoint.resume, self.out / CHECKPOINTS_DIR))
        except (FileNotFoundError, OSError):
            return True  # a named checkpoint that is not there: resume reports it

    def _start_fine_tune(self) -> None:
        """Step 0 of a fresh run: model.bn_mode=recalibrate, then loss.head_init=imprint
        (in that order: the centres come from the recalibrated backbone)."""
        cfg, d = self.cfg, self.d
        if cfg.model.bn_mode == "recalibrate":
            k = min(cfg.model.bn_recalibrate_batches, len(self.loader))
            self.loader.set_epoch(0, start_batch=0)
            it = iter(self.loader)
            dtype = next(self.backbone.parameters()).dtype

            def next_images() -> torch.Tensor:
                images, _ = next(it)
                return to_model_input(images).to(dtype)

            n = recalibrate(self.backbone, next_images, k)
            del it
            log.info("model.bn_mode=recalibrate: running statistics of %d BatchNorm layers re-estimated on %d "
                     "batches x %d ranks", n, k, d.world_size)
        if cfg.loss.head_init == "imprint":
            source = getattr(self.loader, "imprint_source", None)
            if source is None:
                source = FaceRecImages(self.loader.ds, getattr(self.loader, "image_size", (112, 112)))
            t0 = time.time()
            empty = imprint_head(self.head, self.engine.float_backbone(), source, d.device,
                                 batch_size=cfg.data.batch_size, max_per_class=cfg.loss.imprint_max_per_class)
            log.info("loss.head_init=imprint: class centres from the backbone's embeddings in %.1f s "
                     "(%d classes of this rank without an image keep their random centre)", time.time() - t0, empty)

    def close(self) -> None:
        """Release the run folder and the signal handlers (also after a failed setup)."""
        if getattr(self, "preempt", None) is not None:
            self.preempt.uninstall()
        if getattr(self, "lock", None) is not None:
            self.lock.release()
            self.lock = None

    def _build_loader(self):
        cfg, d = self.cfg, self.d
        loader = self.loader_factory(cfg, d)
        self.num_classes = int(loader.num_classes)
        elastic.check_world_size(self.num_classes, d.world_size, cfg.data.train_dir)  # elastic hook
        log.info("data: %s, %d images, %d classes, %d batches of %d per rank per epoch",
                 type(loader).__name__, int(loader.num_images), self.num_classes, len(loader), cfg.data.batch_size)
        if len(loader) == 0:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} x {d.world_size} ranks is larger than "
                              f"the dataset ({loader.num_images} images): no full batch per epoch")
        if cfg.data.num_classes is not None and cfg.data.num_classes != self.num_classes:
            raise ConfigError(f"config key 'data.num_classes' = {cfg.data.num_classes} but the dataset "
                              f"{cfg.data.train_dir} has {self.num_classes} classes")
        self._check_labels(loader)
        return loader

    def _check_labels(self, loader) -> None:
        """Once at startup, from the dataset's labels: at least 2 identities (with one, every
        global batch has one class and the loss is 0), and a class count (``property``) not
        larger than the labels' range unless ``data.num_classes`` says so (classes that never
        appear would be trained as negatives only)."""
        labels = getattr(loader, "labels", None)
        if labels is None:
            return
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
        if labels.size == 0:
            return
        where = self.cfg.data.train_dir or "the dataset"
        present = int(np.unique(labels).size)
        if present < 2:
            raise ConfigError(f"{where}: {present} identity in the labels; training needs at least 2 classes in "
                              "the global batch (with one the loss is 0 and nothing is learnt)")
        top = int(labels.max()) + 1
        if top < self.num_classes and self.cfg.data.num_classes is None:
            raise ConfigError(f"{where}: the class count is {self.num_classes} (property file) but the labels stop "
                              f"at {top - 1}: classes {top}..{self.num_classes - 1} have no image. Fix the property "
                              f"file, or set data.num_classes={self.num_classes} to train with them anyway")

    @property
    def step(self) -> int:
        return self.progress.step

    # ------------------------------------------------------------------ data
    def _next_batch(self):
        p = self.progress
        while True:
            if self._it is None:
                elastic.set_epoch(self.loader, p.epoch, p.batch, p.segments)
                self._it = iter(self.loader)
            try:
                images, labels = next(self._it)
                p.batch += 1
                return to_model_input(images), labels  # cast + normalise on the device
            except StopIteration:
                p.epoch, p.batch, self._it = p.epoch + 1, 0, None
                p.segments = ()

    # ----------------------------------------------------------------- train
    def _one_step(self):
        return self.engine.train_step(self._next_batch)

    def _validate(self, monitor: Monitor) -> None:
        accs = self.validator.run(self.step, self.engine.float_backbone(), self.engine.export_state_dict)
        monitor.validation(self.step, accs, self.validator.best)

    def _save(self) -> None:
        self.checkpointer.save(self.progress, self.engine, self.head, self.head_opt, self.scheduler,
                               self.num_classes, self.validator.best, self.cfg, self.history,
                               self.validator.history)

    def _stop_if_preempted(self, pending: List[tuple]) -> None:
        """Collective, once per step (a host-side gloo all-reduce of one int, no device sync):
        if any rank got a preemption signal, save at this step and stop."""
        if self.progress.step >= self.total_steps:
            return  # the run ends normally with its final checkpoint
        signum = self.preempt.agreed()
        if not signum:
            return
        step = self.progress.step
        self._flush(pending)  # NaN policy and history before the checkpoint
        self.preempt.saving = True
        if not self.checkpointer.exists(step):
            self._save()
        if self.d.is_main:
            self._write_summary()
        barrier()
        raise Preempted(signum, step)

    def _flush(self, pending: List[tuple]) -> None:
        """Read the steps' device values (one host sync) into the history; apply the policies.
        A skipped step changed no weight (the engine decided on the device). Two kinds:

        - an fp16 loss-scale overflow (finite loss, scaled gradients not finite): GradScaler's
          normal event (at the start, then about every ``engine.growth_interval`` steps), counted
          (``overflow_steps``) and logged; :class:`LossScaleError` only when the scale falls below
          ``engine.min_scale`` or after ``engine.max_overflows`` overflows in a row;
        - a non-finite loss (or gradient, where no loss scaler explains it): ``run.nan_policy``;
          ``stop`` raises naming the step, ``skip`` allows ``run.max_skips`` in a row."""
        if not pending:
            return
        rows = []
        nan = float("nan")
        for _, loss, skipped, overflow, scale, kf in pending:
            kept, pairs = kf if len(kf) == 2 else (0.0, 0.0)
            rows.append(torch.stack([torch.as_tensor(v, device=loss.device).float().reshape(())
                                     for v in (loss, skipped, kept, pairs, 0.0 if overflow is None else overflow,
                                               nan if scale is None else scale)]))
        vals = torch.stack(rows).cpu().tolist()
        run, eng = self.cfg.run, self.cfg.engine
        overflowed = []
        for (step, _, _, _, scale_t, _), row in zip(pending, vals):
            rec: Dict[str, Any] = {"step": step, "loss": row[0]}
            if row[3] == row[3] and row[3] > 0:  # NaN / 0: no negative pair that step
                rec["kept_fraction"] = row[2] / row[3]
            scale = row[5]
            if scale_t is not None:
                rec["loss_scale"] = scale
            if row[1] and row[4]:  # fp16 overflow: the scaler skipped the step and lowered the scale
                rec["skipped"], rec["overflow"] = True, True
                self.overflow_steps += 1
                self._overflows += 1
                overflowed.append(step)
                if scale < eng.min_scale or self._overflows >= eng.max_overflows:
                    why = (
                        f"the scale fell to {scale:g} < engine.min_scale={eng.min_scale:g}"
                        if scale < eng.min_scale
                        else f"{self._overflows} overflows in a row (engine.max_overflows={eng.max_overflows}), "
                        f"scale {scale:g}"
                    )
                    raise LossScaleError(
                        f"fp16 loss scaling gave up at step {step}: {why}; the gradients are not finite at any scale "
                        "(no step was applied since the last good one); check lr and data, or train with "
                        "engine.precision=bf16 or fp32, or resume from the last checkpoint")
            elif row[1]:
                rec["skipped"] = True
                self._skips += 1
                if run.nan_policy == "stop":
                    raise NonFiniteLossError(
                        f"non-finite loss or gradient at step {step} (loss {row[0]}): stopping (run.nan_policy=stop; "
                        "the step was not applied); check lr, data and precision, or resume from the last checkpoint")
                if self._skips > run.max_skips:
                    raise NonFiniteLossError(f"non-finite loss at step {step}: {self._skips} steps skipped in a row "
                                             f"(run.max_skips={run.max_skips}); stopping")
                log.warning("non-finite loss or gradient at step %d: step skipped (run.nan_policy=skip)", step)
            else:
                self._skips = self._overflows = 0
            self.history.append(rec)
        if overflowed:
            log.info("fp16 loss-scale overflow at step%s %s: skipped (GradScaler's normal event); scale now %g, "
                     "%d overflow steps in this run", "s" if len(overflowed) > 1 else "",
                     ", ".join(map(str, overflowed)), vals[-1][5], self.overflow_steps)
        pending.clear()

    def train(self) -> Dict[str, Any]:
        cfg, p = self.cfg, self.progress
        per_step = cfg.data.batch_size * self.d.world_size * self.accum
        monitor = Monitor(self.out, self.d.is_main, self.total_steps, p.step, per_step, cfg=cfg.logging)
        self._it, self._skips, self._overflows, pending = None, 0, 0, []
        self.overflow_steps = sum(1 for h in self.history if h.get("overflow"))  # resumed runs count on
        try:
            if cfg.validation.at_start and p.step < self.total_steps:
                self._validate(monitor)
            self.engine.model.train()
            while p.step < self.total_steps:
                self.engine.backbone_frozen = p.step < cfg.optim.freeze_backbone_steps
                out = self._one_step()  # no host sync in steady state (DDP engine)
                p.step += 1
                lr = self.scheduler.get_lr()
                self.scheduler.step()
                stats = getattr(self.head, "last_stats", {}) or {}
                pending.append((p.step, out.loss, out.skipped, out.overflow, out.loss_scale,
                                tuple(stats[k] for k in ("kept", "neg_pairs") if k in stats)))
                log_now = monitor.should_log(p.step)
                val_now, save_now = self.validator.should_validate(p.step), self.checkpointer.should_save(p.step)
                if log_now or val_now or save_now:
                    self._flush(pending)  # NaN policy before any validation or checkpoint
                    if hasattr(self.head, "check_inputs"):
                        self.head.check_inputs()  # labels of the steps since the last check (one sync)
                monitor.record(p.step, p.epoch, lr, self.history[-1]["loss"] if log_now else None, out.grad_norm,
                               lambda: self.history[-1].get("loss_scale"), stats, out.images,
                               overflow_steps=self.overflow_steps if out.overflow is not None else None)
                t_side = time.time()
                if val_now:
                    self._validate(monitor)
                if save_now:
                    self._save()
                self._stop_if_preempted(pending)
                monitor.exclude(time.time() - t_side)
            self._flush(pending)
            if not self.validator.done_at(p.step):
                self._validate(monitor)
            if not self.checkpointer.exists(p.step):
                self._save()
            if self.d.is_main:
                atomic_torch_save(self.engine.export_state_dict(), self.out / "model.pt")
                log.info("wrote %s", self.out / "model.pt")
                self._write_summary()
            barrier()
        finally:
            monitor.close()
            self.close()
        return {"history": self.history, "val": self.validator.history, "best": dict(self.validator.best)}

    def _write_summary(self) -> None:
        """<out>/summary.json: loss per step and every verification (rank 0)."""
        v = self.validator
        summary = {"steps": self.step, "world_size": self.d.world_size, "history": self.history,
                   "val": v.history, "best": dict(v.best)}
        if self.precision == "fp16":  # train/overflow_steps, train/loss_scale (also in TensorBoard)
            summary["overflow_steps"] = getattr(self, "overflow_steps", 0)
            summary["loss_scale"] = self.engine.loss_scale()
        with atomic_open(self.out / "summary.json", "w") as f:
            json.dump(summary, f, indent=1)
        if len(v.history) >= 2:
            a, b = v.history[0], v.history[-1]
            for name in b["acc"]:
                log.info("verification %s: %.4f at step %d -> %.4f at step %d", name,
                         a["acc"].get(name, float("nan")), a["step"], b["acc"][name], b["step"])


def run(cfg: Config, loader_factory: Optional[LoaderFactory] = None) -> Dict[str, Any]:
    """Set up and train; returns the history (used by tests)."""
    return Trainer(cfg, loader_factory).setup().train()
