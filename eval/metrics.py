"""Verification metrics on similarity scores: TAR@FAR, ROC, the full report
(:func:`verify_embeddings`: the whole ``.bin`` report from embeddings of pairs).

The 10-fold accuracy protocol and the pair scores live in
:mod:`trainer.verification_protocol` (training validates with them); this module adds
what evaluation reports on top.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Sequence, Tuple, Union

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from trainer.verification_protocol import (
    DEFAULT_THRESHOLDS,
    check_scores,
    contiguous_folds,
    kfold_accuracy,
    pair_scores,
)

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
) -> Dict[str, Any]:
    """k-fold accuracy + TAR@FAR + AUC in one dict (the ``verify_embeddings`` result)."""
    res = kfold_accuracy(scores, labels, nfolds=nfolds, thresholds=thresholds)
    _, _, auc = roc(scores, labels)
    res["auc"] = auc
    res["tar_at_far"] = tar_at_far(scores, labels, fars)
    res["num_pairs"] = int(np.size(labels))
    res["num_genuine"] = int(np.sum(np.asarray(labels, dtype=bool)))
    return res


# --- read-outs of a TAR (TPR) at a target FAR (FPR), with the FPR actually reached ---------

READOUTS = ("insightface", "strict")


def tar_fpr_at_far(
    scores: np.ndarray, labels: np.ndarray, fars: Iterable[float] = DEFAULT_FARS, readout: str = "insightface"
) -> Dict[float, Tuple[float, float]]:
    """``{far: (tar, achieved_fpr)}`` under one of two read-out rules.

    - ``"strict"``: :func:`tar_at_far` (the best TAR of any threshold whose FPR is <= the
      target; never above it), with the FPR of that threshold.
    - ``"insightface"``: the rule of insightface's ``eval_ijbc.py``, which produces the
      published IJB-B/C tables: scikit-learn's ``roc_curve(labels, scores)`` (default
      ``drop_intermediate=True``), both arrays reversed, and the point whose ``|fpr - far|``
      is smallest, the first such point in the reversed order on ties (so the largest TPR
      among points at the same FPR, and the larger FPR when two are equally near). The
      reached FPR may be above the target.
    """
    if readout not in READOUTS:
        raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
    scores, labels = check_scores(scores, labels)
    if labels.all() or not labels.any():
        raise ValueError("TAR@FAR needs genuine and impostor pairs")
    out: Dict[float, Tuple[float, float]] = {}
    if readout == "strict":
        tars = tar_at_far(scores, labels, fars)
        imp = np.sort(scores[~labels])
        for far, tar in tars.items():
            k = int(np.floor(far * imp.size + 1e-9))
            thr = imp[::-1][k] if k < imp.size else -np.inf
            accepted = imp.size - np.searchsorted(imp, thr, side="right")  # impostors strictly above thr
            out[far] = (tar, float(accepted / imp.size))
        return out
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = fpr[::-1], tpr[::-1]
    for far in fars:
        i = int(np.argmin(np.abs(fpr - float(far))))  # argmin: first minimum
        out[float(far)] = (float(tpr[i]), float(fpr[i]))
    return out


def insightface_val_far(
    scores: np.ndarray, labels: np.ndarray, far_target: float = 1e-3, nfolds: int = 10
) -> Dict[str, Any]:
    """insightface's ``val`` / ``far`` of ``eval/verification.py`` (``calculate_val``).

    On squared distances d = 2 - 2 cos (unit embeddings), "same" when d < threshold. For
    each of ``nfolds`` contiguous folds: the FAR of every threshold of the grid
    ``np.arange(0, 4, 0.001)`` on the other folds; if the largest reaches ``far_target``
    the threshold is the linear interpolation of (FAR, threshold) at ``far_target``, else
    0; ``val`` (TAR) and ``far`` are measured on the held-out fold. Returned: ``val``
    (mean over folds), ``val_std`` (population std), ``far`` (mean), and per-fold values.

    insightface interpolates with ``scipy.interpolate.interp1d(kind="slinear")`` on the raw
    FAR array, which repeats values; recent SciPy refuses that ("Expect x to not have
    duplicates", insightface issue #2152). ``np.interp`` over the same points in the same
    (threshold-ascending) order is the piecewise-linear curve through them: between two
    distinct FARs it joins the last threshold of the lower one to the first threshold of the
    higher one; at a FAR value reached exactly it gives the last threshold with that FAR.
    """
    scores, labels = check_scores(scores, labels)
    dist = 2.0 - 2.0 * scores
    thresholds = np.arange(0, 4, 0.001)
    vals, fars, thrs = [], [], []
    for test_idx in contiguous_folds(scores.size, nfolds):
        train = np.ones(scores.size, dtype=bool)
        train[test_idx] = False
        d_tr, l_tr = dist[train], labels[train]
        neg = np.sort(d_tr[~l_tr])
        if neg.size == 0:
            raise ValueError("val/far: a training split has no impostor pairs")
        far_train = np.searchsorted(neg, thresholds, side="left") / neg.size  # share of d < t
        thr = float(np.interp(far_target, far_train, thresholds)) if far_train.max() >= far_target else 0.0
        d_te, l_te = dist[test_idx], labels[test_idx]
        pred = d_te < thr
        n_same, n_diff = int(l_te.sum()), int((~l_te).sum())
        if n_same == 0 or n_diff == 0:
            raise ValueError(f"val/far: a test fold has {n_same} genuine and {n_diff} impostor pairs (need both)")
        vals.append(float(np.sum(pred & l_te) / n_same))
        fars.append(float(np.sum(pred & ~l_te) / n_diff))
        thrs.append(thr)
    return {
        "val": float(np.mean(vals)),
        "val_std": float(np.std(vals)),
        "far": float(np.mean(fars)),
        "far_target": float(far_target),
        "fold_val": vals,
        "fold_far": fars,
        "fold_threshold_d2": thrs,
    }


def verify_embeddings(
    emb: Union[torch.Tensor, np.ndarray],
    issame: Union[Sequence[bool], np.ndarray],
    nfolds: int = 10,
    fars: Sequence[float] = DEFAULT_FARS,
) -> Dict[str, Any]:
    """The standard protocol on embeddings of pairs (2k, 2k+1).

    Returns accuracy / accuracy_std (10 contiguous folds, threshold from a grid chosen on
    the other 9), threshold, auc, tar_at_far {far: tar} (incl. 1e-3 and 1e-4), plus
    fold details and pair counts. Scores are cosine similarities of the embeddings
    (they are L2-normalised again here, so raw features are fine too).
    """
    e = emb.detach().cpu().numpy() if isinstance(emb, torch.Tensor) else np.asarray(emb)
    e = e.astype(np.float64)
    same = np.asarray(issame, dtype=bool)
    if e.ndim != 2 or e.shape[0] != 2 * same.size:
        raise ValueError(f"{e.shape[0] if e.ndim else 0} embeddings for {same.size} pairs")
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    e = e / np.maximum(norms, 1e-12)
    return evaluate_scores(pair_scores(e), same, nfolds=nfolds, fars=fars)
