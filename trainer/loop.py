"""The trainer: sequences the components and runs the loop.

Components (each owns one concern, built by :mod:`trainer.build`): the data loader
(``trainer.data``), the backbone (``trainer.backbones``), the head and its optimizer
(``trainer.heads``, used through the :class:`~trainer.heads.protocol.Head` protocol),
the engine (``trainer.engine``: DDP or DeepSpeed, precision, the one step path), the
LR schedule (``trainer.optim``), the validator (``trainer.validator``) and the monitor
(``trainer.monitor``). The run's state is :class:`~trainer.state.TrainState` and
:class:`~trainer.state.RunHistory`; :class:`~trainer.guard.StepGuard` counts skipped
steps and applies their policies; the :class:`~trainer.checkpointer.Checkpointer` is
built once with every stateful part and saves / loads them all.

Order of :meth:`Trainer.setup`, so that a refused run changes nothing: take the
run folder's lock (rank 0, :mod:`trainer.runtime.run_lock`), build the components (the
data's class count and labels checked), move a previous run aside (``resume: none``)
or refuse a finished one, resume (checkpoint and configuration checks) or start
(fine-tuning's step 0), and only then write ``config.yaml``. :meth:`Trainer.train`
stops on a preemption signal after a checkpoint at the current step
(:mod:`trainer.runtime.preemption`).
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
from trainer.batchnorm import recalibrate
from trainer.build import (
    LoaderFactory,
    build_backbone,
    build_head,
    build_loader,
    build_run_engine,
    build_scheduler,
    default_loader_factory,
)
from trainer.checkpointer import Checkpointer, ResumeError, is_restart, resume_candidates, will_resume
from trainer.config import Config, to_yaml
from trainer.data.model_input import to_model_input
from trainer.guard import StepGuard
from trainer.imprint import FaceRecImages, imprint_head
from trainer.io.atomic import atomic_open, atomic_torch_save
from trainer.monitor import Monitor, setup_logging
from trainer.pretrained import init_backbone
from trainer.runtime.preemption import Preempted, PreemptionHandler
from trainer.runtime.process_group import all_ok, barrier, init_distributed
from trainer.runtime.run_lock import RunLock, RunLockedError, die_with_parent, under_torchrun
from trainer.state import RunHistory, TrainState
from trainer.validator import Validator

log = logging.getLogger("trainer")

__all__ = ["Trainer", "run"]


class Trainer:
    """``Trainer(cfg).setup().train()``; the components are public attributes (tests use them).

    State: :attr:`state` (:class:`~trainer.state.TrainState`: step, epoch, samples, best,
    skip counts), :attr:`history` (one record per step) and the validator's history; the
    checkpointer is built with every stateful part and saves / restores them all.
    """

    def __init__(self, cfg: Config, loader_factory: Optional[LoaderFactory] = None) -> None:
        self.cfg = cfg
        self.loader_factory = loader_factory or default_loader_factory
        self.out = Path(cfg.run.output)
        self.history: List[Dict[str, Any]] = []   # per optimizer step: step, loss, ...
        self.state = TrainState()
        self.lock: Optional[RunLock] = None
        self.preempt: Optional[PreemptionHandler] = None
        self._it = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> Trainer:
        if under_torchrun():
            die_with_parent()  # no orphan keeps training if the agent dies
        self.d = init_distributed()
        self.preempt = PreemptionHandler(self.cfg.run.preempt_signals, self.d.device).install()
        try:
            self._on_main(self._take_folder, RunLockedError, "rank 0 could not lock the run folder")
            barrier()
            setup_logging(self.out, self.d.rank)
            self._build()
            self._resume_or_start()
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
        """The components (trainer.build), the run's state, and the checkpointer over them."""
        cfg, d = self.cfg, self.d
        # Same backbone init on every rank; per-rank streams for everything else.
        torch.manual_seed(cfg.run.seed)
        random.seed(cfg.run.seed + d.rank)
        np.random.seed((cfg.run.seed + d.rank) % 2**32)
        self.loader = build_loader(cfg, d, self.loader_factory)
        self.num_classes = int(self.loader.num_classes)
        self.backbone = build_backbone(cfg, d.device)
        # model.init_from: before the engine (DeepSpeed copies the weights into its optimizer),
        # and only for a run that starts at step 0 (a checkpoint wins; a changed init_from on
        # resume is a config-diff error, RESUME_KEYS)
        self.init_info = None
        cands = resume_candidates(cfg.checkpoint, self.out)
        if cfg.model.init_from and not will_resume(cands):
            self.init_info = init_backbone(self.backbone, cfg.model.init_from, cfg.model.init_strict)
        torch.manual_seed(cfg.run.seed + 1 + d.rank)
        self.head, self.head_opt, head_lr = build_head(cfg, self.num_classes, d.device)
        # data.keep_global_batch: the accumulation that keeps the checkpoint's global batch (trainer.elastic);
        # an epoch is counted in global batches, the same at any world size. Rank 0's reading is
        # used on every rank (grad_accum_for agrees on it), so only rank 0 reads a checkpoint.
        self.accum, global_batch = elastic.grad_accum_for(cfg, d.world_size, (cands or []) if d.is_main else [])
        n = getattr(self.loader, "num_images", None)
        self.steps_per_epoch = max(1, int(n) // global_batch if n else len(self.loader) // self.accum)
        self.total_steps = (
            cfg.run.max_steps if cfg.run.max_steps is not None else cfg.run.num_epochs * self.steps_per_epoch
        )
        self.engine = build_run_engine(cfg, self.backbone, self.head, self.head_opt, d, self.accum)
        self.precision = self.engine.precision
        self.scheduler = build_scheduler(cfg, self.engine, self.head_opt, head_lr, self.total_steps)
        self.validator = Validator.build(cfg.validation, cfg.data.train_dir, d, self.out, self.total_steps)
        self.state = TrainState(best=self.validator.best, samples_per_step=global_batch, world_size=d.world_size,
                                batch_size=cfg.data.batch_size, keep_global_batch=cfg.data.keep_global_batch)
        self.guard = StepGuard(self.state, self.history, cfg.run.nan_policy, cfg.run.max_skips,
                               cfg.engine.min_scale, cfg.engine.max_overflows)
        self.checkpointer = Checkpointer(
            cfg.checkpoint, self.out, d,
            {"engine": self.engine, "head": self.head, "head_opt": self.head_opt, "scheduler": self.scheduler,
             "progress": self.state, "history": RunHistory(self.history, self.validator.history)},
            total_steps=self.total_steps, config=cfg, seed=cfg.run.seed)

    def _resume_or_start(self) -> None:
        """Load the checkpoint (or start: fine-tuning's step 0), then write ``config.yaml``."""
        self._on_main(self.checkpointer.prepare, ResumeError, "rank 0 refused the run folder")
        barrier()
        if self.checkpointer.load() is None:
            self._start_fine_tune()
        if self.d.is_main:  # only now: every check of this run has passed
            with atomic_open(self.out / "config.yaml", "w") as f:
                f.write(to_yaml(self.cfg))
            log.info("resolved config (saved to %s):\n%s", self.out / "config.yaml", to_yaml(self.cfg))
        barrier()

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
        if self.preempt is not None:
            self.preempt.uninstall()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def overflow_steps(self) -> int:
        return self.state.overflow_steps

    # ------------------------------------------------------------------ data
    def _next_batch(self):
        st = self.state
        while True:
            if self._it is None:
                elastic.set_epoch(self.loader, st.epoch, st.batch, st.segments)
                self._it = iter(self.loader)
            try:
                images, labels = next(self._it)
                st.batch += 1
                return to_model_input(images), labels  # cast + normalise on the device
            except StopIteration:
                st.epoch, st.batch, st.segments, self._it = st.epoch + 1, 0, (), None

    # ----------------------------------------------------------------- train
    def _one_step(self):
        return self.engine.train_step(self._next_batch)

    def _validate(self, monitor: Monitor) -> None:
        accs = self.validator.run(self.step, self.engine.float_backbone(), self.engine.export_state_dict)
        monitor.validation(self.step, accs, self.validator.best)

    def _stop_if_preempted(self) -> None:
        """Collective, once per step (a host-side gloo all-reduce of one int, no device sync):
        if any rank got a preemption signal, save at this step and stop."""
        if self.step >= self.total_steps:
            return  # the run ends normally with its final checkpoint
        preempt = self.preempt
        assert preempt is not None, "Trainer.setup() installs the preemption handler"
        signum = preempt.agreed()
        if not signum:
            return
        step = self.step
        self.guard.flush()  # NaN policy and history before the checkpoint
        preempt.saving = True
        if not self.checkpointer.exists(step):
            self.checkpointer.save(step)
        if self.d.is_main:
            self._write_summary()
        barrier()
        raise Preempted(signum, step)

    def train(self) -> Dict[str, Any]:
        cfg, st, guard = self.cfg, self.state, self.guard
        monitor = Monitor(self.out, self.d.is_main, self.total_steps, st.step, st.samples_per_step, cfg=cfg.logging)
        self._it = None
        try:
            if cfg.validation.at_start and st.step < self.total_steps:
                self._validate(monitor)
            self.engine.model.train()
            while st.step < self.total_steps:
                self.engine.backbone_frozen = st.step < cfg.optim.freeze_backbone_steps
                out = self._one_step()  # no host sync in steady state (DDP engine)
                st.advance()
                lr = self.scheduler.get_lr()
                self.scheduler.step()
                guard.push(st.step, out, self.head.step_stats())
                log_now = monitor.should_log(st.step)
                val_now, save_now = self.validator.should_validate(st.step), self.checkpointer.should_save(st.step)
                if log_now or val_now or save_now:
                    guard.flush()  # NaN policy before any validation or checkpoint
                    self.head.check_inputs()  # labels of the steps since the last check (one sync)
                monitor.record(st.step, st.epoch, lr, self.history[-1]["loss"] if log_now else None, out.grad_norm,
                               guard.last_loss_scale, self.head.stats, out.images,
                               overflow_steps=st.overflow_steps if out.overflow is not None else None)
                t_side = time.time()
                if val_now:
                    self._validate(monitor)
                if save_now:
                    self.checkpointer.save(st.step)
                self._stop_if_preempted()
                monitor.exclude(time.time() - t_side)
            guard.flush()
            if not self.validator.done_at(st.step):
                self._validate(monitor)
            if not self.checkpointer.exists(st.step):
                self.checkpointer.save(st.step)
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
            summary["overflow_steps"] = self.state.overflow_steps
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
