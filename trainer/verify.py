"""Verification accuracy on insightface ``.bin`` sets during training.

Thin wrapper over the evaluation package (``eval.verification``: load_bin,
embed_images, verify_embeddings = insightface's 10-fold protocol), holding the
decoded sets in memory and the best accuracy per set.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Optional

import numpy as np
import torch
from torch import nn


class Verifier:
    """``run(model)`` -> {set name: accuracy}; ``best`` keeps the maximum per set."""

    def __init__(self, paths: Dict[str, Path], device: Optional[torch.device] = None,
                 batch_size: int = 128) -> None:
        from eval.verification import load_bin

        self.sets = {name: load_bin(str(p), image_size=112) for name, p in paths.items()}
        self.device = device
        self.batch_size = batch_size
        self.best: Dict[str, float] = {}

    def run(self, model: nn.Module) -> Dict[str, float]:
        from eval.verification import embed_images, verify_embeddings

        was_training = model.training
        model.eval()
        try:
            out = {}
            for name, (images, issame) in self.sets.items():
                emb = embed_images(model, images, batch_size=self.batch_size, device=self.device,
                                   progress=False)
                acc = float(verify_embeddings(emb, np.asarray(issame), nfolds=10)["accuracy"])
                out[name] = acc
                self.best[name] = max(acc, self.best.get(name, 0.0))
            return out
        finally:
            model.train(was_training)


def resolve_targets(val_dir: str, targets: Iterable[str], fallback_dir: str) -> Dict[str, Path]:
    """``{name: <dir>/<name>.bin}``; a missing file is an error naming it."""
    base = Path(val_dir or fallback_dir)
    out = {}
    for t in targets:
        p = base / (t if t.endswith(".bin") else f"{t}.bin")
        if not p.is_file():
            raise FileNotFoundError(f"verification target '{t}': {p} not found (data.val_dir={base})")
        out[Path(t).stem] = p
    return out
