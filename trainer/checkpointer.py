"""Checkpoint manager: what a checkpoint holds, when one is written, resume and reshard.

The on-disk format and its guarantees (atomic files, COMPLETE marker last,
re-slicing of head shards at another world size) are :mod:`trainer.checkpoint`'s;
this component decides what goes in and puts it back.

Resume rules (``checkpoint.resume``):

- ``auto``: the newest complete checkpoint that every rank can load. If complete
  checkpoints exist and NONE loads, the run stops (:class:`ResumeError`, listing
  each candidate and why) instead of starting over on top of the old run; a run
  folder with a ``model.pt`` but no checkpoint stops too.
- ``none``: start over deliberately. The previous run's files (``checkpoints/``,
  ``model.pt``, ``model_best.pt``, ``summary.json``, ``config.yaml``, ``tensorboard/``) are moved
  into ``<output>/previous-<UTC time>/``, never deleted. Under a torchrun restart
  (``TORCHELASTIC_RESTART_COUNT`` > 0) or a SLURM requeue (``SLURM_RESTART_COUNT``
  > 0) of the same job, ``none`` acts as ``auto``: the job resumes its own checkpoints.
- a path: that checkpoint; failing to load it is an error.

A loaded checkpoint whose configuration differs from this run's in the keys of
:data:`trainer.config.RESUME_KEYS` (model, loss, dataset, optimizer) stops the run
with the differing keys, unless ``checkpoint.allow_config_change: true``.
The loss history (``summary.json``'s ``history``) and the verification history
travel inside ``trainer.pt``, so ``summary.json`` covers the whole run.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from trainer import checkpoint as ckpt
from trainer import elastic
from trainer.collectives import class_range
from trainer.config import CheckpointConfig, Config, ConfigError, config_diff, to_dict
from trainer.distributed import DistInfo, all_ok, barrier, gather_strings
from trainer.io.atomic import atomic_torch_save

log = logging.getLogger("trainer")


@dataclass
class Progress:
    """Where training is: optimizer steps done, epoch, micro-batches consumed in it."""
    step: int = 0
    epoch: int = 0
    batch: int = 0
    segments: tuple = ()  # parts of this epoch run at another world size / batch (trainer.elastic)


class ResumeError(RuntimeError):
    """Checkpoints exist but none can be resumed from (each candidate and why in the message)."""


#: what ``resume: none`` moves aside (into ``<output>/previous-<time>/``)
PREVIOUS_RUN_FILES = (ckpt.CHECKPOINTS_DIR, "model.pt", "model_best.pt", "summary.json", "config.yaml", "tensorboard")


def is_restart() -> bool:
    """This process is a restart of the same job (torchrun group restart, SLURM requeue)."""
    return any(int(os.environ.get(k, "0") or 0) > 0 for k in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))


def move_previous_run(out: Path) -> Optional[Path]:
    """Rank 0: move the previous run's files into ``<out>/previous-<UTC time>/``; returns it (None: nothing)."""
    out = Path(out)
    present = [n for n in PREVIOUS_RUN_FILES if (out / n).exists()]
    if not present:
        return None
    dest = out / time.strftime("previous-%Y%m%d-%H%M%S", time.gmtime())
    n = 1
    while dest.exists():
        dest = out / f"{dest.name.split('.')[0]}.{n}"
        n += 1
    dest.mkdir()
    for name in present:
        os.replace(out / name, dest / name)
    return dest


def history_to_tensors(history: List[Dict[str, float]]) -> Dict[str, torch.Tensor]:
    """Per-step loss history as plain tensors (NaN where a step has no value of a key)."""
    keys = sorted({k for h in history for k in h if k != "step"})
    out = {"step": torch.tensor([int(h["step"]) for h in history], dtype=torch.int64)}
    for k in keys:
        out[k] = torch.tensor([float(h.get(k, math.nan)) for h in history], dtype=torch.float64)
    return out


def history_from_tensors(t: Dict[str, torch.Tensor], upto: int) -> List[Dict[str, float]]:
    steps = t["step"].tolist()
    cols = {k: v.tolist() for k, v in t.items() if k != "step"}
    out = []
    for i, s in enumerate(steps):
        if s <= upto:
            rec = {k: v[i] for k, v in cols.items() if not math.isnan(v[i])}
            if "skipped" in rec:
                rec["skipped"] = bool(rec["skipped"])
            out.append({"step": int(s), **rec})
    return out


@dataclass
class Resumed:
    progress: Progress
    best: Dict[str, float] = field(default_factory=dict)
    history: List[Dict[str, float]] = field(default_factory=list)      # per step: step, loss, ...
    val_history: List[Dict[str, Any]] = field(default_factory=list)    # per verification: step, acc


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, out: Path, d: DistInfo, total_steps: int) -> None:
        self.cfg = cfg
        self.root = Path(out) / ckpt.CHECKPOINTS_DIR
        self.d = d
        self.total_steps = total_steps

    def should_save(self, step: int) -> bool:
        return bool(self.cfg.save_every) and step % self.cfg.save_every == 0 and step < self.total_steps

    def exists(self, step: int) -> bool:
        return ckpt.checkpoint_dir(self.root, step).joinpath(ckpt.MARKER).exists()

    def _class_ranges(self, num_classes: int) -> List[Tuple[int, int]]:
        return [tuple(class_range(num_classes, r, self.d.world_size)) for r in range(self.d.world_size)]

    def save(self, progress: Progress, engine, head, head_opt, scheduler, num_classes: int,
             best: Dict[str, float], config: Config, history: Optional[List[Dict[str, float]]] = None,
             val_history: Optional[List[Dict[str, Any]]] = None) -> Path:
        """Collective: every rank writes its shard, rank 0 the trainer state and the marker."""
        d = self.d
        path = ckpt.checkpoint_dir(self.root, progress.step)
        if d.is_main:
            ckpt.begin_save(path)
        barrier()
        engine.save_extra(path)
        ckpt.write_shard(path, d.rank, {"class_range": tuple(head.class_range), "num_classes": num_classes,
                                        "head": head.state_dict(), "optimizer": head_opt.state_dict()})
        if d.is_main:
            state = {"backbone": engine.backbone.state_dict(), **engine.state_dict(),
                     "scheduler": scheduler.state_dict(), "step": progress.step, "epoch": progress.epoch,
                     "batch": progress.batch, "world_size": d.world_size, "num_classes": num_classes,
                     # elastic hook (trainer.elastic): the epoch's earlier segments, this one's batch size
                     "segments": [list(s) for s in progress.segments], "batch_size": config.data.batch_size,
                     "global_batch": config.data.batch_size * d.world_size * engine.accum,
                     "best": dict(best), "config": to_dict(config),
                     "history": history_to_tensors(history or []),
                     "val_history": [{"step": int(v["step"]), "acc": {str(k): float(a) for k, a in v["acc"].items()}}
                                     for v in (val_history or [])]}
            atomic_torch_save(state, path / "trainer.pt")
        barrier()
        if d.is_main:
            ckpt.finish_save(path, progress.step, d.world_size, self._class_ranges(num_classes), self.cfg.keep_last)
            log.info("saved checkpoint %s", path)
        barrier()
        return path

    def prepare(self) -> Optional[Path]:
        """Rank 0, before anything is written: ``resume: none`` moves the previous run aside
        (not on a restart of the same job); ``auto`` refuses a folder that holds a final
        ``model.pt`` but no checkpoint to resume from. Returns the folder moved to."""
        out = self.root.parent
        if self.cfg.resume == "none" and not is_restart():
            dest = move_previous_run(out)
            if dest is not None:
                log.warning("checkpoint.resume=none: the previous run's files in %s were moved to %s", out, dest)
            return dest
        if self.cfg.resume in ("auto", "none") and (out / "model.pt").exists() and not ckpt.list_checkpoints(self.root):
            raise ResumeError(f"{out} holds a finished run (model.pt) but no checkpoint to resume from; "
                              "set checkpoint.resume=none to start over (the old files are moved aside), "
                              "or choose another run.output")
        return None

    def resume(self, engine, head, head_opt, scheduler, num_classes: int, seed: int,
               config: Optional[Config] = None) -> Optional[Resumed]:
        """Load the newest loadable checkpoint (``resume: auto``) or the named one into the
        components; None when starting fresh (see the module docstring for the rules)."""
        d = self.d
        mode = "auto" if self.cfg.resume == "none" and is_restart() else self.cfg.resume
        cands = ckpt.find_resume_candidates(mode, self.root)
        if not cands:
            return None

        def load(p: Path):
            meta, state, shard = ckpt.load_for_rank(p, d.rank, d.world_size, tuple(head.class_range))
            if state["num_classes"] != num_classes:
                raise ValueError(f"{p}: {state['num_classes']} classes, dataset has {num_classes}")
            check = getattr(engine, "check_checkpoint", None)  # the engine's own files (DeepSpeed's)
            if check is not None:
                check(p, meta["world_size"] == d.world_size)
            return meta, state, shard

        path, res, failures = ckpt.try_load(cands, load, all_ok)
        if path is None:
            # every rank's reasons, so the message names the failing file wherever it is
            per_rank = gather_strings("\n".join(f"{p}\t{why}" for p, why in failures))
            lines = []
            for i, p in enumerate(cands):
                whys = []
                for r, text in enumerate(per_rank):
                    row = text.split("\n")[i] if text else ""
                    why = row.split("\t", 1)[1] if "\t" in row else "?"
                    if not why.startswith("another rank"):
                        whys.append(f"rank {r}: {why}")
                lines.append(f"  {p}: " + ("; ".join(whys) or "unreadable"))
            hint = ("; nothing was changed. Fix or remove them, point checkpoint.resume at one, or set "
                    "checkpoint.resume=none to start over (the old files are moved aside)")
            raise ResumeError(f"checkpoint.resume={self.cfg.resume}: none of the {len(cands)} complete "
                              f"checkpoint(s) in {self.root} could be loaded{hint}:\n" + "\n".join(lines))
        meta, state, shard = res
        if config is not None and isinstance(state.get("config"), dict):
            diff = config_diff(state["config"], to_dict(config))
            if diff:
                text = "\n".join(f"  {k}: {a!r} (checkpoint) -> {b!r} (this run)" for k, a, b in diff)
                if not self.cfg.allow_config_change:
                    raise ConfigError(f"{path}: this run's configuration differs from the checkpoint's:\n{text}\n"
                                      "resuming would mix two experiments; set checkpoint.allow_config_change=true "
                                      "to continue anyway, checkpoint.resume=none to start over, or use another "
                                      "run.output")
                log.warning("%s: configuration changed on resume (checkpoint.allow_config_change=true):\n%s",
                            path, text)
        same_world = meta["world_size"] == d.world_size
        engine.backbone.load_state_dict(state["backbone"])
        engine.load_state_dict(state, path, same_world)
        saved_dtype = shard["head"]["weight"].dtype
        if saved_dtype != head.weight.dtype:
            log.warning("%s: class centres and momentum stored as %s, this run keeps them as %s "
                        "(loss.state_dtype): converted on load%s", path, saved_dtype, head.weight.dtype,
                        " (rounded to nearest)" if head.weight.element_size() < saved_dtype.itemsize else " (exact)")
        head.load_state_dict(shard["head"])
        head_opt.load_state_dict(shard["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        progress = Progress(int(state["step"]), int(state["epoch"]), int(state["batch"]))
        if config is not None:  # elastic hook: a change of world size / batch mid-epoch starts a segment
            progress.batch, progress.segments = elastic.continue_epoch(
                state, d.world_size, config.data.batch_size, str(path))
            elastic.check_resumed_global_batch(state, config.data.batch_size * d.world_size * engine.accum,
                                               config.data.keep_global_batch, str(path))
        if same_world and "rng" in shard:
            ckpt.set_rng_state(shard["rng"])
        else:
            torch.manual_seed(seed + 7919 * progress.step + d.rank)
        log.info("resumed from %s (step %d, epoch %d, batch %d, world size %d -> %d)", path,
                 progress.step, progress.epoch, progress.batch, meta["world_size"], d.world_size)
        hist = state.get("history")
        return Resumed(progress, dict(state.get("best", {})),
                       history_from_tensors(hist, progress.step) if isinstance(hist, dict) and "step" in hist else [],
                       [v for v in state.get("val_history", []) if int(v["step"]) <= progress.step])


__all__ = ["CheckpointManager", "Progress", "ResumeError", "Resumed", "move_previous_run"]
