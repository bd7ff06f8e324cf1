"""Periodic verification on ``.bin`` sets and the best-model policy.

Rank 0 decodes the sets once and evaluates the backbone with
:mod:`trainer.verification_protocol` (the same code ``python -m eval.verify`` reports
with); the other ranks wait at a barrier. The best model is the one with the
highest sum of accuracies over the configured sets: ``<out>/model_best.pt``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from trainer.io.atomic import atomic_torch_save
from trainer.runtime.process_group import DistInfo, barrier
from trainer.section import ValidationConfig
from trainer.verification_protocol import embed_images, load_bin, verify_accuracy

log = logging.getLogger("trainer")


def resolve_targets(val_dir: str, targets: Iterable[str], fallback_dir: str) -> Dict[str, Path]:
    """``{name: <dir>/<name>.bin}``; a missing file is an error naming it."""
    base = Path(val_dir or fallback_dir)
    out = {}
    for t in targets:
        p = base / (t if t.endswith(".bin") else f"{t}.bin")
        if not p.is_file():
            raise FileNotFoundError(f"verification target '{t}': {p} not found (validation.val_dir={base})")
        out[Path(t).stem] = p
    return out


class Validator:
    """``run(step, model)`` -> {set: accuracy} on rank 0 (None elsewhere); keeps ``best`` and ``history``."""

    def __init__(self, cfg: ValidationConfig, paths: Dict[str, Path], d: DistInfo, out: Path,
                 total_steps: int, batch_size: int = 128) -> None:
        self.cfg = cfg
        self.d = d
        self.out = Path(out)
        self.total_steps = total_steps
        self.batch_size = batch_size
        self.sets = ({name: load_bin(str(p), image_size=112) for name, p in paths.items()}
                     if d.is_main else {})
        self.enabled = bool(paths)
        self.best: Dict[str, float] = {}
        self.history: List[Dict[str, Any]] = []

    @classmethod
    def build(cls, cfg: ValidationConfig, train_dir: str, d: DistInfo, out: Path, total_steps: int) -> Validator:
        paths = resolve_targets(cfg.val_dir, cfg.targets, train_dir) if cfg.targets else {}
        return cls(cfg, paths, d, out, total_steps)

    def should_validate(self, step: int) -> bool:
        return self.enabled and bool(self.cfg.every) and step % self.cfg.every == 0 and step < self.total_steps

    def done_at(self, step: int) -> bool:
        return not self.enabled or (bool(self.history) and self.history[-1]["step"] == step)

    def accuracies(self, model: nn.Module) -> Dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            out = {}
            for name, (images, issame) in self.sets.items():
                emb = embed_images(model, images, batch_size=self.batch_size, device=self.d.device, progress=False)
                out[name] = float(verify_accuracy(emb, issame, nfolds=10)["accuracy"])
            return out
        finally:
            model.train(was_training)

    def run(self, step: int, model: nn.Module, export: Callable[[], Dict[str, torch.Tensor]]
            ) -> Optional[Dict[str, float]]:
        """Collective (barrier); rank 0 evaluates, updates ``best`` and writes model_best.pt."""
        accs = None
        if self.enabled and self.d.is_main:
            prev = dict(self.best)
            accs = self.accuracies(model)
            self.history.append({"step": step, "acc": dict(accs)})
            for name, acc in accs.items():
                self.best[name] = max(acc, self.best.get(name, 0.0))
                log.info("verification step %d %s accuracy %.4f (best %.4f)", step, name, acc, self.best[name])
            if step > 0 and (not prev or sum(accs.values()) > sum(prev.get(k, 0.0) for k in accs)):
                atomic_torch_save(export(), self.out / "model_best.pt")
                log.info("new best verification at step %d: wrote %s", step, self.out / "model_best.pt")
        elif self.enabled:
            self.history.append({"step": step, "acc": {}})
        barrier()
        return accs
