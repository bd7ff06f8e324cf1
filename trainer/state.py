"""The run's own state, registered with the checkpointer like every other stateful part.

:class:`TrainState`: where training is (optimizer steps, epoch, micro-batches of the
epoch consumed, samples seen), the best verification accuracies, and the counts of
skipped steps. :class:`RunHistory`: the loss history (one record per step) and the
verification history. Both keep the keys they have always had at the top level of
``trainer.pt`` (``step``, ``epoch``, ``batch``, ``best``, ``history``, ``val_history``),
so checkpoints of any version load; the keys added since (``samples``,
``skipped_steps``, ``overflow_steps``) are derived from the history when absent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List

import torch


@dataclass
class TrainState:
    step: int = 0                 # optimizer steps done (skipped ones included)
    epoch: int = 0
    batch: int = 0                # micro-batches of this epoch consumed (per rank)
    samples: int = 0              # images seen, all ranks (skipped steps included)
    skipped_steps: int = 0        # non-finite loss steps skipped (run.nan_policy=skip), the whole run
    overflow_steps: int = 0       # fp16 loss-scale overflows (skipped by GradScaler), the whole run
    best: Dict[str, float] = field(default_factory=dict)  # per verification set; the validator's dict
    segments: tuple = ()          # parts of this epoch run at another world size / per-rank batch
    samples_per_step: int = 0     # not saved: data.batch_size x ranks x optim.grad_accum of this run
    world_size: int = 0           # not saved (the checkpoint's own is): this run's ranks...
    batch_size: int = 0           # ...and per-rank batch; with them a resume at another size
    keep_global_batch: bool = True  # closes the saved segment (trainer.elastic)
    _loaded: Any = field(default=None, repr=False)  # the state being loaded, until load_files

    def advance(self) -> None:
        """One optimizer step done."""
        self.step += 1
        self.samples += self.samples_per_step

    def state_dict(self) -> Dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch, "samples": self.samples,
                "skipped_steps": self.skipped_steps, "overflow_steps": self.overflow_steps, "best": dict(self.best),
                # trainer.elastic: the epoch's earlier segments, this segment's per-rank batch, the global batch
                "segments": [list(s) for s in self.segments], "batch_size": self.batch_size,
                "global_batch": self.samples_per_step}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """From ``trainer.pt`` (its top level). A checkpoint written before ``samples`` and the
        skip counts were saved: samples = steps x this run's samples per step, counts from
        the saved history."""
        self.step, self.epoch, self.batch = int(state["step"]), int(state["epoch"]), int(state["batch"])
        self.samples = int(state.get("samples", self.step * self.samples_per_step))
        flags = _history_flags(state.get("history"), self.step)
        self.skipped_steps = int(state.get("skipped_steps", flags["skipped"] - flags["overflow"]))
        self.overflow_steps = int(state.get("overflow_steps", flags["overflow"]))
        self.best.clear()  # in place: the validator holds the same dict
        self.best.update({str(k): float(v) for k, v in dict(state.get("best", {})).items()})
        self._loaded = state

    def load_files(self, ckpt_dir: Any, same_world: bool) -> None:
        """After :meth:`load_state_dict` (the checkpointer's hook, with the checkpoint's path):
        a resume at another world size or per-rank batch closes the saved segment of the
        epoch, and the global batch must be the one the accumulation was derived from."""
        from trainer import elastic

        state, self._loaded = self._loaded, None
        if state is None or not self.world_size:
            return
        self.batch, self.segments = elastic.continue_epoch(state, self.world_size, self.batch_size, str(ckpt_dir))
        elastic.check_resumed_global_batch(state, self.samples_per_step, self.keep_global_batch, str(ckpt_dir))


def _history_flags(hist: Any, upto: int) -> Dict[str, int]:
    out = {"skipped": 0, "overflow": 0}
    if not isinstance(hist, dict) or "step" not in hist:
        return out
    keep = hist["step"] <= upto
    for k in out:
        if k in hist:
            out[k] = int(((hist[k] == 1) & keep).sum())
    return out


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
            for flag in ("skipped", "overflow"):
                if flag in rec:
                    rec[flag] = bool(rec[flag])
            out.append({"step": int(s), **rec})
    return out


@dataclass
class RunHistory:
    """``steps``: one record per optimizer step (step, loss, ...); ``val``: one per
    verification (step, acc). Lists shared with the loop and the validator, changed in place."""
    steps: List[Dict[str, Any]] = field(default_factory=list)
    val: List[Dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> Dict[str, Any]:
        return {"history": history_to_tensors(self.steps),
                "val_history": [{"step": int(v["step"]), "acc": {str(k): float(a) for k, a in v["acc"].items()}}
                                for v in self.val]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """From ``trainer.pt``: the records up to its ``step`` (a checkpoint never holds later ones,
        but a copy of a newer summary might)."""
        upto = int(state["step"])
        hist = state.get("history")
        self.steps[:] = history_from_tensors(hist, upto) if isinstance(hist, dict) and "step" in hist else []
        self.val[:] = [v for v in state.get("val_history", []) if int(v["step"]) <= upto]


__all__ = ["RunHistory", "TrainState", "history_from_tensors", "history_to_tensors"]
