"""The full verification report on embeddings of pairs (2k, 2k+1).

Loading ``.bin`` sets and embedding them is :mod:`trainer.verification` (shared
with training's validator); this adds TAR@FAR and AUC to the 10-fold accuracy.
"""
from __future__ import annotations

from typing import Dict, Sequence, Union

import numpy as np
import torch

from eval.metrics import DEFAULT_FARS, evaluate_scores
from trainer.verification import pair_scores


def verify_embeddings(
    emb: Union[torch.Tensor, np.ndarray],
    issame: Sequence[bool],
    nfolds: int = 10,
    fars: Sequence[float] = DEFAULT_FARS,
) -> Dict[str, object]:
    """The standard protocol on embeddings of pairs (2k, 2k+1).

    Returns accuracy / accuracy_std (10 contiguous folds, threshold from a grid chosen on
    the other 9), threshold, auc, tar_at_far {far: tar} (incl. 1e-3 and 1e-4), plus
    fold details and pair counts. Scores are cosine similarities of the embeddings
    (they are L2-normalised again here, so raw features are fine too).
    """
    emb = emb.detach().cpu().numpy() if isinstance(emb, torch.Tensor) else np.asarray(emb)
    emb = emb.astype(np.float64)
    issame = np.asarray(issame, dtype=bool)
    if emb.ndim != 2 or emb.shape[0] != 2 * issame.size:
        raise ValueError(f"{emb.shape[0] if emb.ndim else 0} embeddings for {issame.size} pairs")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = emb / np.maximum(norms, 1e-12)
    return evaluate_scores(pair_scores(emb), issame, nfolds=nfolds, fars=fars)
