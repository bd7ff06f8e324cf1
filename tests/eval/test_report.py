"""Report helpers: ROC thinning, plots, markdown and JSON."""
import json

import numpy as np
from sklearn.metrics import roc_curve

from eval import report
from eval.metrics import evaluate_scores


def test_downsample_curve_is_max_tpr_at_or_below_each_far():
    rng = np.random.default_rng(0)
    labels = rng.random(5000) < 0.3
    scores = np.where(labels, rng.normal(1, 1, 5000), rng.normal(0, 1, 5000))
    fpr, tpr, _ = roc_curve(labels, scores)
    d = report.downsample_curve(fpr, tpr, n=50)
    assert d["far"][-1] == 1.0 and d["tar"][-1] == 1.0
    for far, tar in zip(d["far"], d["tar"]):
        assert tar == tpr[fpr <= far].max()


def test_plots_markdown_and_json(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.random(400) < 0.5
    scores = np.clip(np.where(labels, rng.normal(0.5, 0.2, 400), rng.normal(0, 0.2, 400)), -1, 1)
    res = evaluate_scores(scores, labels)
    fpr, tpr, _ = roc_curve(labels, scores)
    big = (np.r_[0, np.sort(rng.random(10000)), 1], np.r_[0, np.sort(rng.random(10000)), 1])  # thinned when plotted
    for p in (report.plot_roc({"a": (fpr, tpr), "big": big}, tmp_path / "roc.png"),
              report.plot_score_hist(scores, labels, tmp_path / "h.png", threshold=res["threshold"])):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = report.markdown_table({"lfw": res, "partial": {"accuracy": 0.5, "accuracy_std": 0.0}}, fars=(1e-3,))
    assert md.splitlines()[0] == "| set | accuracy (%) | threshold | AUC | TAR@FAR=1e-3 (%) |"
    assert md.splitlines()[2].startswith(f"| lfw | {100 * res['accuracy']:.2f} ± ")
    assert md.splitlines()[3] == "| partial | 50.00 ± 0.00 | - | - | - |"
    report.write_json({"r": res, "arr": np.arange(3)}, tmp_path / "r.json")
    back = json.loads((tmp_path / "r.json").read_text())
    assert back["r"]["tar_at_far"]["1e-3"] == res["tar_at_far"][1e-3] and back["arr"] == [0, 1, 2]
