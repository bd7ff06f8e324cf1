"""Verification accuracy on insightface ``.bin`` sets during training.

Uses the evaluation package (``eval.verification``: load_bin, embed_images,
verify_embeddings) when it is available; until then a minimal equivalent
behind the same interface: decode with PIL, embed image + horizontal flip
(summed, L2-normalised), 10-fold cross-validated best-threshold accuracy.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn


def _fallback_load_bin(path, image_size: int = 112) -> Tuple[torch.Tensor, np.ndarray]:
    from PIL import Image

    from eval.bin_io import read_bin

    bins, issame = read_bin(path)
    imgs = []
    for i, b in enumerate(bins):
        try:
            im = Image.open(io.BytesIO(b)).convert("RGB")
        except Exception as e:
            raise ValueError(f"{path}: image {i} cannot be decoded ({e})") from e
        if im.size != (image_size, image_size):
            im = im.resize((image_size, image_size))
        imgs.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
    return torch.stack(imgs), np.asarray(issame, dtype=bool)


@torch.no_grad()
def _fallback_embed(model: nn.Module, images: torch.Tensor, batch_size: int = 128,
                    device: Optional[torch.device] = None) -> torch.Tensor:
    device = device or next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device).float().div(127.5).sub(1.0)
        e = model(x).float() + model(torch.flip(x, dims=[3])).float()
        out.append(nn.functional.normalize(e, dim=1).cpu())
    return torch.cat(out)


def _fallback_verify(emb: torch.Tensor, issame: np.ndarray, nfolds: int = 10) -> Dict[str, float]:
    e = emb.numpy()
    sims = (e[0::2] * e[1::2]).sum(1)
    n = len(issame)
    folds = np.array_split(np.arange(n), min(nfolds, n))
    accs, ths = [], []
    for f in folds:
        train = np.setdiff1d(np.arange(n), f)
        cands = np.unique(sims[train]) if len(train) else np.array([0.0])
        acc_tr = [((sims[train] >= t) == issame[train]).mean() for t in cands]
        t = cands[int(np.argmax(acc_tr))]
        ths.append(t)
        accs.append(((sims[f] >= t) == issame[f]).mean())
    return {"accuracy": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
            "threshold": float(np.mean(ths))}


def _api():
    try:
        from eval.verification import embed_images, load_bin, verify_embeddings  # type: ignore

        return load_bin, embed_images, verify_embeddings
    except ImportError:
        return _fallback_load_bin, _fallback_embed, _fallback_verify


class Verifier:
    """Holds decoded ``.bin`` sets; ``run(model)`` -> {name: accuracy}; tracks the best."""

    def __init__(self, paths: Dict[str, Path], device: Optional[torch.device] = None,
                 batch_size: int = 128) -> None:
        load_bin, self._embed, self._verify = _api()
        self.sets = {name: load_bin(str(p), image_size=112) for name, p in paths.items()}
        self.device = device
        self.batch_size = batch_size
        self.best: Dict[str, float] = {}

    def run(self, model: nn.Module) -> Dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            out = {}
            for name, (images, issame) in self.sets.items():
                emb = self._embed(model, images, batch_size=self.batch_size, device=self.device)
                acc = float(self._verify(emb, np.asarray(issame), nfolds=10)["accuracy"])
                out[name] = acc
                self.best[name] = max(acc, self.best.get(name, 0.0))
            return out
        finally:
            model.train(was_training)


def resolve_targets(val_dir: str, targets, fallback_dir: str) -> Dict[str, Path]:
    """``{name: <dir>/<name>.bin}``; a missing file is an error naming it."""
    base = Path(val_dir or fallback_dir)
    out = {}
    for t in targets:
        p = base / (t if t.endswith(".bin") else f"{t}.bin")
        if not p.is_file():
            raise FileNotFoundError(f"verification target '{t}': {p} not found (data.val_dir={base})")
        out[Path(t).stem] = p
    return out
