"""Verification metrics on similarity scores: TAR@FAR, ROC, the full report.

The 10-fold accuracy protocol and the pair scores live in
:mod:`trainer.verification` (training validates with them); this module adds
what evaluation reports on top.
"""
from __future__ import annotations

from typing import Dict, Iterable, Sequence, Tuple

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from trainer.verification import DEFAULT_THRESHOLDS, check_scores, kfold_accuracy

DEFAULT_FARS: Tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def tar_at_far(scores: np.ndarray, labels: np.ndarray, fars: Iterable[float] = DEFAULT_FARS) -> Dict[float, float]:
    """True accept rate at each false accept rate.

    For a target FAR f with n impostor pairs, at most k = floor(f * n) impostors may be
    accepted; the threshold is the (k+1)-th highest impostor score and a pair is accepted
    when its score is strictly above it. This is the highest TAR of any threshold whose
    FAR is <= f (never interpolated). When f * n < 1 the requirement is FAR = 0.
    """
    scores, labels = check_scores(scores, labels)
    gen = scores[labels]
    imp = np.sort(scores[~labels])[::-1]
    if gen.size == 0 or imp.size == 0:
        raise ValueError(f"TAR@FAR needs genuine and impostor pairs (got {gen.size} and {imp.size})")
    out: Dict[float, float] = {}
    for far in fars:
        k = int(np.floor(float(far) * imp.size + 1e-9))
        thr = imp[k] if k < imp.size else -np.inf
        out[float(far)] = float(np.mean(gen > thr))
    return out


def roc(scores: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray, float]:
    """(fpr, tpr, auc) from scikit-learn."""
    scores, labels = check_scores(scores, labels)
    if labels.all() or not labels.any():
        raise ValueError("ROC needs both genuine and impostor pairs")
    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr, tpr, float(roc_auc_score(labels, scores))


def evaluate_scores(
    scores: np.ndarray,
    labels: np.ndarray,
    nfolds: int = 10,
    fars: Sequence[float] = DEFAULT_FARS,
    thresholds: np.ndarray = DEFAULT_THRESHOLDS,
) -> Dict[str, object]:
    """k-fold accuracy + TAR@FAR + AUC in one dict (the ``verify_embeddings`` result)."""
    res = kfold_accuracy(scores, labels, nfolds=nfolds, thresholds=thresholds)
    _, _, auc = roc(scores, labels)
    res["auc"] = auc
    res["tar_at_far"] = tar_at_far(scores, labels, fars)
    res["num_pairs"] = int(np.size(labels))
    res["num_genuine"] = int(np.sum(np.asarray(labels, dtype=bool)))
    return res
