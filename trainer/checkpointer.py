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
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Protocol, Tuple, cast

import torch

from trainer import checkpoint as ckpt
from trainer.collectives import class_range
from trainer.config import CheckpointConfig, Config, ConfigError, config_diff, to_dict
from trainer.heads.protocol import Head
from trainer.io.atomic import atomic_torch_save
from trainer.runtime.process_group import DistInfo, all_ok, barrier, gather_strings

log = logging.getLogger("trainer")


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


#: Where each registered state lives on disk: (file, key). ``trainer``: rank 0's
#: ``trainer.pt``; ``shard``: every rank's ``shard_RRRRR.pt`` (re-sliced by class rows at
#: another world size, so only the class-sharded states go there). Key None: the
#: state's entries sit at the top level of the file. The names are those of the first
#: format, so checkpoints of every version load; a state not listed goes to
#: ``trainer.pt`` under its own name.
LAYOUT: Dict[str, Tuple[str, Optional[str]]] = {
    "engine": ("trainer", None),        # backbone, optimizer, scaler
    "scheduler": ("trainer", "scheduler"),
    "progress": ("trainer", None),      # step, epoch, batch, samples, best, skip counts
    "history": ("trainer", None),       # history, val_history
    "head": ("shard", "head"),
    "head_opt": ("shard", "optimizer"),
}


class Stateful(Protocol):
    """A part the checkpointer saves and restores. Optional hooks, called when present:
    ``save_files(ckpt_dir)`` (collective: files of its own, DeepSpeed's),
    ``check_files(ckpt_dir, same_world)`` (before a checkpoint is chosen: raise to make it
    unloadable) and ``load_files(ckpt_dir, same_world)`` (after ``load_state_dict``)."""

    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any], /) -> Any: ...


def resume_mode(cfg: CheckpointConfig) -> str:
    """``checkpoint.resume``, with ``none`` read as ``auto`` on a restart of the same job."""
    return "auto" if cfg.resume == "none" and is_restart() else cfg.resume


def resume_candidates(cfg: CheckpointConfig, out: Path) -> Optional[List[Path]]:
    """The checkpoints :meth:`Checkpointer.load` will try, best first, before the components
    (and so the checkpointer) exist; None when ``checkpoint.resume`` names one that is not
    there (``load`` reports it)."""
    try:
        return ckpt.find_resume_candidates(resume_mode(cfg), Path(out) / ckpt.CHECKPOINTS_DIR)
    except (FileNotFoundError, OSError):
        return None


def will_resume(candidates: Optional[List[Path]]) -> bool:
    """Whether setup will load a checkpoint (then it, not ``model.init_from``, sets the weights),
    from :func:`resume_candidates` (a named checkpoint that is missing counts: ``load`` fails)."""
    return candidates is None or bool(candidates)


def _where(name: str) -> Tuple[str, Optional[str]]:
    return LAYOUT.get(name, ("trainer", name))


class Checkpointer:
    """Saves and restores the stateful parts it was built with.

    ``states``: name -> part (:class:`Stateful`); ``states["head"]`` is the class-sharded
    head (its ``class_range`` and ``num_classes`` place the shards). ``config``: written
    into ``trainer.pt`` and compared on resume; ``seed``: the RNG seed of a resume whose
    RNG states cannot be restored (another world size).
    """

    def __init__(self, cfg: CheckpointConfig, out: Path, d: DistInfo, states: Mapping[str, Stateful], *,
                 total_steps: int, config: Optional[Config] = None, seed: int = 0) -> None:
        self.cfg = cfg
        self.root = Path(out) / ckpt.CHECKPOINTS_DIR
        self.d = d
        self.states = dict(states)
        self.total_steps = total_steps
        self.config = config
        self.seed = seed
        if "head" not in self.states:
            raise ValueError("Checkpointer: states must hold the class-sharded 'head'")
        self.head = cast(Head, self.states["head"])  # the class-sharded part: class_range, num_classes

    def should_save(self, step: int) -> bool:
        return bool(self.cfg.save_every) and step % self.cfg.save_every == 0 and step < self.total_steps

    def exists(self, step: int) -> bool:
        return ckpt.checkpoint_dir(self.root, step).joinpath(ckpt.MARKER).exists()

    @property
    def num_classes(self) -> int:
        return int(self.head.num_classes)

    @property
    def class_range(self) -> Tuple[int, int]:
        """This rank's classes ``(start, stop)``, as a tuple."""
        start, stop = self.head.class_range
        return start, stop

    def _hooks(self, hook: str):
        return [getattr(s, hook) for s in self.states.values() if callable(getattr(s, hook, None))]

    def _files(self) -> Dict[str, Dict[str, Any]]:
        """{"trainer": trainer.pt's content, "shard": this rank's shard} from every state."""
        files: Dict[str, Dict[str, Any]] = {"trainer": {}, "shard": {}}
        for name, part in self.states.items():
            where, key = _where(name)
            if where == "trainer" and not self.d.is_main:
                continue
            sd = part.state_dict()
            entries = sd if key is None else {key: sd}
            clash = set(entries) & set(files[where])
            if clash:
                raise ValueError(f"Checkpointer: state {name!r} writes {sorted(clash)}, already written by another")
            files[where].update(entries)
        return files

    def save(self, step: int) -> Path:
        """Collective: every rank writes its shard, rank 0 ``trainer.pt`` and the marker."""
        d = self.d
        path = ckpt.checkpoint_dir(self.root, step)
        if d.is_main:
            ckpt.begin_save(path)
        barrier()
        for save_files in self._hooks("save_files"):
            save_files(path)
        files = self._files()
        ckpt.write_shard(path, d.rank, {"class_range": self.class_range, "num_classes": self.num_classes,
                                        **files["shard"]})
        if d.is_main:
            state = {**files["trainer"], "world_size": d.world_size, "num_classes": self.num_classes}
            if self.config is not None:
                state["config"] = to_dict(self.config)
            atomic_torch_save(state, path / "trainer.pt")
        barrier()
        if d.is_main:
            ranges = [class_range(self.num_classes, r, d.world_size) for r in range(d.world_size)]
            ckpt.finish_save(path, step, d.world_size, ranges, self.cfg.keep_last)
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

    def _mode(self) -> str:
        return resume_mode(self.cfg)

    def load(self) -> Optional[Path]:
        """Load the newest loadable checkpoint (``resume: auto``) or the named one into every
        registered state; None when starting fresh (see the module docstring for the rules)."""
        d = self.d
        cands = ckpt.find_resume_candidates(self._mode(), self.root)
        if not cands:
            return None

        def read(p: Path):
            meta, state, shard = ckpt.load_for_rank(p, d.rank, d.world_size, self.class_range)
            if state["num_classes"] != self.num_classes:
                raise ValueError(f"{p}: {state['num_classes']} classes, dataset has {self.num_classes}")
            for check_files in self._hooks("check_files"):  # the parts' own files (DeepSpeed's)
                check_files(p, meta["world_size"] == d.world_size)
            return meta, state, shard

        path, res, failures = ckpt.try_load(cands, read, all_ok)
        if path is None:
            raise ResumeError(self._none_loadable(cands, failures))
        meta, state, shard = res
        self._check_config(path, state)
        same_world = meta["world_size"] == d.world_size
        files = {"trainer": state, "shard": shard}
        for name, part in self.states.items():
            where, key = _where(name)
            part.load_state_dict(files[where] if key is None else files[where][key])
            load_files = getattr(part, "load_files", None)
            if callable(load_files):
                load_files(path, same_world)
        step = int(state["step"])
        if same_world and "rng" in shard:
            ckpt.set_rng_state(shard["rng"])
        else:
            torch.manual_seed(self.seed + 7919 * step + d.rank)
        log.info("resumed from %s (step %d, epoch %d, batch %d, world size %d -> %d)", path,
                 step, int(state["epoch"]), int(state["batch"]), meta["world_size"], d.world_size)
        return path

    def _none_loadable(self, cands: List[Path], failures: List[Tuple[Path, str]]) -> str:
        """The message when no candidate loads: every rank's reasons, so it names the failing
        file wherever it is."""
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
        return (f"checkpoint.resume={self.cfg.resume}: none of the {len(cands)} complete "
                f"checkpoint(s) in {self.root} could be loaded{hint}:\n" + "\n".join(lines))

    def _check_config(self, path: Path, state: Dict[str, Any]) -> None:
        if self.config is None or not isinstance(state.get("config"), dict):
            return
        diff = config_diff(state["config"], to_dict(self.config))
        if not diff:
            return
        text = "\n".join(f"  {k}: {a!r} (checkpoint) -> {b!r} (this run)" for k, a, b in diff)
        if not self.cfg.allow_config_change:
            raise ConfigError(f"{path}: this run's configuration differs from the checkpoint's:\n{text}\n"
                              "resuming would mix two experiments; set checkpoint.allow_config_change=true "
                              "to continue anyway, checkpoint.resume=none to start over, or use another "
                              "run.output")
        log.warning("%s: configuration changed on resume (checkpoint.allow_config_change=true):\n%s", path, text)


__all__ = ["Checkpointer", "LAYOUT", "ResumeError", "Stateful", "move_previous_run", "resume_candidates", "resume_mode",
           "will_resume"]
