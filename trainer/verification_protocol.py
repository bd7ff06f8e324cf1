"""Verification on insightface ``.bin`` sets: what training validates with.

    images, issame = load_bin(path, image_size=112)   # uint8 [2P,3,S,S] RGB, bool [P]
    emb = embed_images(model, images, batch_size=128)  # float32 [2P,D] CPU
    res = kfold_accuracy(pair_scores(emb), issame)     # the 10-fold LFW protocol

Embeddings are emb(x) + emb(flip(x)), L2-normalised; the model sees RGB scaled to
[-1, 1] ((x - 127.5) / 127.5), as insightface's backbones do. Scores are cosine
similarities of L2-normalised embeddings ("same" when the score is above a
threshold). For unit vectors the squared distance insightface thresholds on is
``2 - 2 cos``, so a cosine grid is the same protocol with the grid in the other
unit. The evaluation package (``eval``) builds its reports (TAR@FAR, ROC, plots)
on these functions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from trainer.data.model_input import to_model_input
from trainer.io.binfile import read_bin
from trainer.io.images import decode_rgb, resize_rgb

DeviceLike = Union[str, torch.device, None]

# insightface scans squared distance 0..4 in steps of 0.01 (400 values); this is
# the same spacing in cosine (d^2 = 2 - 2cos -> step 0.005), with both ends.
DEFAULT_THRESHOLDS = np.linspace(-1.0, 1.0, 401)


def check_scores(scores: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores for {labels.size} labels")
    if scores.size == 0:
        raise ValueError("no pairs to evaluate")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN/inf (did the model output NaN?)")
    return scores, labels


def contiguous_folds(n: int, nfolds: int) -> list:
    """Index arrays of ``nfolds`` contiguous folds (sklearn ``KFold(shuffle=False)`` split)."""
    if not 2 <= nfolds <= n:
        raise ValueError(f"need 2 <= nfolds <= number of pairs, got nfolds={nfolds}, pairs={n}")
    sizes = np.full(nfolds, n // nfolds, dtype=int)
    sizes[: n % nfolds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.arange(bounds[k], bounds[k + 1]) for k in range(nfolds)]


def _accuracy_per_threshold(scores: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Accuracy of ``score > t`` for every t, in O((n + T) log n) via sorting."""
    # a pair is predicted "same" when score > t: count positives above, negatives at/below
    pos_sorted = np.sort(scores[labels])
    neg_sorted = np.sort(scores[~labels])
    tp = pos_sorted.size - np.searchsorted(pos_sorted, thresholds, side="right")
    tn = np.searchsorted(neg_sorted, thresholds, side="right")
    return (tp + tn) / scores.size


def kfold_accuracy(
    scores: np.ndarray,
    labels: np.ndarray,
    nfolds: int = 10,
    thresholds: np.ndarray = DEFAULT_THRESHOLDS,
) -> Dict[str, Any]:
    """The LFW protocol: for each of ``nfolds`` contiguous folds pick the grid threshold
    with the best accuracy on the other folds, measure accuracy on the held-out fold.

    Ties between thresholds go to the highest (strictest) one, as in insightface.
    Returns accuracy (mean), accuracy_std, threshold (mean of the chosen ones),
    fold_accuracies, fold_thresholds.
    """
    scores, labels = check_scores(scores, labels)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    accs, thrs = [], []
    for test_idx in contiguous_folds(scores.size, nfolds):
        train = np.ones(scores.size, dtype=bool)
        train[test_idx] = False
        train_acc = _accuracy_per_threshold(scores[train], labels[train], thresholds)
        # last maximum = the strictest threshold among equals: insightface scans distance
        # ascending and keeps the first maximum, i.e. the highest cosine
        best = thresholds[len(thresholds) - 1 - int(np.argmax(train_acc[::-1]))]
        pred = scores[test_idx] > best
        accs.append(float(np.mean(pred == labels[test_idx])))
        thrs.append(float(best))
    return {
        "accuracy": float(np.mean(accs)),
        "accuracy_std": float(np.std(accs)),
        "threshold": float(np.mean(thrs)),
        "fold_accuracies": accs,
        "fold_thresholds": thrs,
    }


def pair_scores(emb: np.ndarray) -> np.ndarray:
    """Cosine similarity of pairs (2k, 2k+1) of already L2-normalised embeddings."""
    emb = np.asarray(emb, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] % 2:
        raise ValueError(f"expected [2P, D] embeddings, got shape {tuple(emb.shape)}")
    return np.sum(emb[0::2] * emb[1::2], axis=1)


def load_bin(path: Union[str, Path], image_size: int = 112) -> Tuple[torch.Tensor, np.ndarray]:
    """Read a verification ``.bin`` (restricted unpickler) and decode it.

    Returns ``images`` (uint8 tensor [2P, 3, image_size, image_size], RGB) and ``issame``
    (bool numpy [P]). Images of another size are resized (bilinear).
    """
    bins, issame = read_bin(path)
    out = torch.empty((len(bins), 3, image_size, image_size), dtype=torch.uint8)
    for i, data in enumerate(bins):
        img = decode_rgb(data, where=f"{path}: image {i}", lenient=True)
        img = resize_rgb(img, image_size)
        out[i] = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
    return out, np.asarray(issame, dtype=bool)


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@torch.no_grad()
def embed_images(
    model: torch.nn.Module,
    images: torch.Tensor,
    batch_size: int = 128,
    device: DeviceLike = None,
    *,
    progress: Optional[bool] = None,
    desc: str = "embed",
    flip: bool = True,
    normalize: bool = True,
) -> torch.Tensor:
    """Embeddings ``float32 [N, D]`` on the CPU: emb(x) + emb(flip x) (``flip``; else
    emb(x)), L2-normalised (``normalize``; IJB's norm score keeps them raw).

    ``images`` is uint8 RGB [N, 3, H, W]. The model runs in eval mode under no_grad on
    ``device`` (default: where its parameters are); its train/eval mode is restored
    afterwards. ``progress``: tqdm bar (None = only on a terminal).
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images [N,3,H,W], got {images.dtype} {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    chunks = []
    try:
        starts = range(0, images.shape[0], batch_size)
        for s in tqdm(starts, desc=desc, disable=(None if progress is None else not progress), leave=False):
            x = to_model_input(images[s : s + batch_size].to(device, non_blocking=True), layout="NCHW")
            n = x.shape[0]
            out = model(torch.cat([x, torch.flip(x, dims=[3])], dim=0) if flip else x)
            if isinstance(out, (tuple, list)):
                out = out[0]
            out = out.float()
            rows = 2 * n if flip else n
            if out.ndim != 2 or out.shape[0] != rows:
                raise ValueError(f"model returned shape {tuple(out.shape)} for a batch of {rows}; expected [N, D]")
            emb = out[:n] + out[n:] if flip else out
            chunks.append((torch.nn.functional.normalize(emb, dim=1) if normalize else emb).cpu())
    finally:
        model.train(was_training)
    if not chunks:
        return torch.empty((0, 0), dtype=torch.float32)
    emb = torch.cat(chunks)
    if not torch.isfinite(emb).all():
        raise ValueError("model produced NaN/inf embeddings")
    return emb




def verify_accuracy(
    emb: Union[torch.Tensor, np.ndarray], issame: Union[Sequence[bool], np.ndarray], nfolds: int = 10
) -> Dict[str, Any]:
    """10-fold accuracy of embeddings of pairs (2k, 2k+1); they are L2-normalised here."""
    e = emb.detach().cpu().numpy() if isinstance(emb, torch.Tensor) else np.asarray(emb)
    e = e.astype(np.float64)
    same = np.asarray(issame, dtype=bool)
    if e.ndim != 2 or e.shape[0] != 2 * same.size:
        raise ValueError(f"{e.shape[0] if e.ndim else 0} embeddings for {same.size} pairs")
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    return kfold_accuracy(pair_scores(e), same, nfolds=nfolds)
