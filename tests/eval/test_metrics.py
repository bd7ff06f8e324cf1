"""The verification protocol on synthetic scores with known answers, cross-checked against scikit-learn."""
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from eval.metrics import evaluate_scores, tar_at_far, verify_embeddings
from trainer.verification_protocol import contiguous_folds, kfold_accuracy


def _sk_tar_at_far(scores, labels, far):
    """Independent: the best TPR among ROC points (score >= t) with FPR <= far."""
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(tpr[fpr <= far + 1e-12].max())


def _sk_best_threshold_accuracy(scores, labels):
    """Independent: best accuracy over every ROC threshold (accuracy = (TP + TN) / n)."""
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    p, n = labels.sum(), (~labels).sum()
    return float(np.max((tpr * p + (1 - fpr) * n) / (p + n)))


def test_folds_are_contiguous_and_cover():
    folds = contiguous_folds(23, 10)
    assert [len(f) for f in folds] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert np.array_equal(np.concatenate(folds), np.arange(23))
    with pytest.raises(ValueError):
        contiguous_folds(5, 10)


def test_separable_scores_give_perfect_accuracy():
    rng = np.random.default_rng(0)
    labels = rng.random(600) < 0.5
    scores = np.where(labels, rng.uniform(0.45, 0.9, 600), rng.uniform(-0.3, 0.35, 600))
    res = evaluate_scores(scores, labels)
    assert res["accuracy"] == 1.0 and res["accuracy_std"] == 0.0
    lo, hi = scores[~labels].max(), scores[labels].min()
    assert all(lo <= t < hi for t in res["fold_thresholds"])
    assert res["threshold"] > hi - 0.0051  # the strictest grid threshold among ties (grid step 0.005)
    assert res["auc"] == 1.0
    assert all(v == 1.0 for v in res["tar_at_far"].values())


def test_known_error_count():
    # 100 pairs per fold, one impostor per fold placed far above all genuine scores:
    # it is always misclassified -> accuracy exactly 0.99 on every fold
    labels = np.tile(np.r_[np.ones(50, bool), np.zeros(50, bool)], 10)
    scores = np.where(labels, 0.6, 0.0)
    scores[np.arange(10) * 100 + 50] = 0.95
    res = kfold_accuracy(scores, labels)
    assert res["accuracy"] == pytest.approx(0.99)
    assert res["accuracy_std"] == pytest.approx(0.0)
    assert res["fold_accuracies"] == pytest.approx([0.99] * 10)


def test_threshold_is_learned_on_other_folds_only():
    # fold 0 is shifted so its own best threshold differs from the other folds' -> it loses accuracy
    labels = np.tile(np.r_[np.ones(5, bool), np.zeros(5, bool)], 10)
    scores = np.where(labels, 0.5, 0.2)
    scores[:10] -= 0.35  # fold 0: genuine 0.15, impostor -0.15; the others' threshold is in [0.2, 0.5)
    res = kfold_accuracy(scores, labels)
    assert res["fold_accuracies"][0] == 0.5  # genuine of fold 0 rejected
    assert all(a == 1.0 for a in res["fold_accuracies"][1:])


def test_accuracy_close_to_sklearn_oracle_and_auc_matches():
    rng = np.random.default_rng(1)
    labels = rng.random(6000) < 0.5
    scores = np.clip(np.where(labels, rng.normal(0.45, 0.15, 6000), rng.normal(0.05, 0.12, 6000)), -1, 1)
    res = evaluate_scores(scores, labels)
    oracle = _sk_best_threshold_accuracy(scores, labels)  # threshold chosen on all data: an upper bound
    assert res["accuracy"] <= oracle + 1e-12
    assert res["accuracy"] == pytest.approx(oracle, abs=0.006)
    assert res["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tar_at_far_matches_sklearn_roc(seed):
    rng = np.random.default_rng(seed)
    n = 20000
    labels = rng.random(n) < 0.1
    scores = np.where(labels, rng.normal(0.5, 0.2, n), rng.normal(0.0, 0.2, n))
    scores = np.round(scores, 3)  # ties
    fars = (1e-4, 1e-3, 1e-2, 1e-1)
    got = tar_at_far(scores, labels, fars)
    for far in fars:
        assert got[far] == pytest.approx(_sk_tar_at_far(scores, labels, far), abs=1e-12)


def test_tar_at_far_small_example():
    # impostors 0.9, 0.5, 0.1 ... ; FAR=1/3 allows one false accept -> threshold 0.5 (strict)
    scores = np.array([0.9, 0.5, 0.1, 0.95, 0.6, 0.5, 0.2])
    labels = np.array([0, 0, 0, 1, 1, 1, 1], bool)
    res = tar_at_far(scores, labels, (0.34, 0.1, 1.0))
    assert res[0.34] == pytest.approx(0.5)  # 0.95, 0.6 above 0.5
    assert res[0.1] == pytest.approx(0.25)  # only 0.95 above 0.9
    assert res[1.0] == 1.0


def test_verify_embeddings_contract_on_planted_embeddings():
    rng = np.random.default_rng(3)
    P, D = 300, 16
    issame = np.arange(P) % 2 == 0
    base = rng.normal(size=(P, D))
    other = rng.normal(size=(P, D))
    emb = np.empty((2 * P, D))
    emb[0::2] = base
    emb[1::2] = np.where(issame[:, None], base + 0.05 * rng.normal(size=(P, D)), other)
    res = verify_embeddings(emb, issame, nfolds=10)
    for key in ("accuracy", "accuracy_std", "threshold", "auc", "tar_at_far"):
        assert key in res
    assert 1e-3 in res["tar_at_far"] and 1e-4 in res["tar_at_far"]
    assert res["accuracy"] == 1.0
    with pytest.raises(ValueError):
        verify_embeddings(emb[:-2], issame)
    with pytest.raises(ValueError, match="NaN"):
        bad = emb.copy()
        bad[0] = np.nan
        verify_embeddings(bad, issame)


def _insightface_style_accuracy(emb1, emb2, issame, nfolds=10):
    """Independent re-statement of insightface's verification protocol: squared L2 distance,
    thresholds arange(0, 4, 0.01), sklearn KFold(shuffle=False), first best threshold,
    'same' when dist < threshold."""
    from sklearn.model_selection import KFold

    dist = np.sum((emb1 - emb2) ** 2, axis=1)
    thresholds = np.arange(0, 4, 0.01)
    accs = []
    for train, test in KFold(n_splits=nfolds, shuffle=False).split(np.arange(len(issame))):
        acc_train = [np.mean((dist[train] < t) == issame[train]) for t in thresholds]
        best = thresholds[int(np.argmax(acc_train))]
        accs.append(np.mean((dist[test] < best) == issame[test]))
    return float(np.mean(accs)), float(np.std(accs))


@pytest.mark.parametrize("seed", [0, 1])
def test_accuracy_equals_insightface_protocol(seed):
    rng = np.random.default_rng(seed)
    P, D = 1200, 32
    issame = rng.random(P) < 0.5
    a = rng.normal(size=(P, D))
    b = np.where(issame[:, None], a + rng.normal(0, 1.1, size=(P, D)), rng.normal(size=(P, D)))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    emb = np.empty((2 * P, D))
    emb[0::2], emb[1::2] = a, b
    res = verify_embeddings(emb, issame)
    acc, std = _insightface_style_accuracy(a, b, issame)
    assert 0.6 < acc < 0.99  # a non-trivial case
    assert res["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert res["accuracy_std"] == pytest.approx(std, abs=1e-12)
