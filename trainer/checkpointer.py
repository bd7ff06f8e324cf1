"""Checkpoint manager: what a checkpoint holds, when one is written, resume and reshard.

The on-disk format and its guarantees (atomic files, COMPLETE marker last,
re-slicing of head shards at another world size) are :mod:`trainer.checkpoint`'s;
this component decides what goes in and puts it back.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from trainer import checkpoint as ckpt
from trainer.collectives import class_range
from trainer.config import CheckpointConfig, Config, to_dict
from trainer.distributed import DistInfo, all_ok, barrier
from trainer.io.atomic import atomic_torch_save

log = logging.getLogger("trainer")


@dataclass
class Progress:
    """Where training is: optimizer steps done, epoch, micro-batches consumed in it."""
    step: int = 0
    epoch: int = 0
    batch: int = 0


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
             best: Dict[str, float], config: Config) -> Path:
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
                     "best": dict(best), "config": to_dict(config)}
            atomic_torch_save(state, path / "trainer.pt")
        barrier()
        if d.is_main:
            ckpt.finish_save(path, progress.step, d.world_size, self._class_ranges(num_classes), self.cfg.keep_last)
            log.info("saved checkpoint %s", path)
        barrier()
        return path

    def resume(self, engine, head, head_opt, scheduler, num_classes: int, seed: int
               ) -> Optional[Tuple[Progress, Dict[str, float]]]:
        """Load the newest loadable checkpoint (``resume: auto``) or the named one into the
        components; returns (progress, best accuracies) or None when starting fresh."""
        d = self.d
        cands = ckpt.find_resume_candidates(self.cfg.resume, self.root)
        if not cands:
            return None

        def load(p: Path):
            meta, state, shard = ckpt.load_for_rank(p, d.rank, d.world_size, tuple(head.class_range))
            if state["num_classes"] != num_classes:
                raise ValueError(f"{p}: {state['num_classes']} classes, dataset has {num_classes}")
            return meta, state, shard

        path, res = ckpt.try_load(cands, load, all_ok)
        if path is None:
            if self.cfg.resume != "auto":
                raise RuntimeError(f"checkpoint.resume={self.cfg.resume}: checkpoint could not be loaded")
            log.warning("no loadable checkpoint in %s; starting from scratch", self.root)
            return None
        meta, state, shard = res
        same_world = meta["world_size"] == d.world_size
        engine.backbone.load_state_dict(state["backbone"])
        engine.load_state_dict(state, path, same_world)
        head.load_state_dict(shard["head"])
        head_opt.load_state_dict(shard["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        progress = Progress(int(state["step"]), int(state["epoch"]), int(state["batch"]))
        if same_world and "rng" in shard:
            ckpt.set_rng_state(shard["rng"])
        else:
            torch.manual_seed(seed + 7919 * progress.step + d.rank)
        log.info("resumed from %s (step %d, epoch %d, batch %d, world size %d -> %d)", path,
                 progress.step, progress.epoch, progress.batch, meta["world_size"], d.world_size)
        return progress, dict(state.get("best", {}))


__all__ = ["CheckpointManager", "Progress"]
