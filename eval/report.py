"""Evaluation reports: ROC curves (log FAR), score histograms, markdown and JSON tables."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping, Sequence, Tuple, Union

import numpy as np

from trainer.io.atomic import atomic_open


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")


def plot_roc(curves: Mapping[str, Tuple[np.ndarray, np.ndarray]], path: Union[str, Path], title: str = "ROC") -> Path:
    """One PNG with a TAR-vs-FAR curve per entry of ``curves`` (name -> (fpr, tpr)); FAR on a log axis."""
    plt = _plt()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, (fpr, tpr) in curves.items():
        fpr = np.asarray(fpr)
        tpr = np.asarray(tpr)
        if fpr.size > 4000:  # IJB-C ROCs have millions of points: plot a log-spaced thinning
            thin = downsample_curve(fpr, tpr, n=2000)
            fpr, tpr = np.asarray(thin["far"]), np.asarray(thin["tar"])
        keep = fpr > 0  # log axis
        ax.plot(fpr[keep], tpr[keep], label=name, lw=1.5)
    ax.set_xscale("log")
    min_far = min(
        (float(np.min(np.asarray(f)[np.asarray(f) > 0], initial=1.0)) for f, _ in curves.values()), default=1.0
    )
    ax.set_xlim(left=max(1e-6, 10 ** np.floor(np.log10(min(min_far, 1e-1)))), right=1.0)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("False accept rate")
    ax.set_ylabel("True accept rate")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    _save(fig, path)
    plt.close(fig)
    return path


def plot_score_hist(
    scores: np.ndarray,
    labels: np.ndarray,
    path: Union[str, Path],
    title: str = "scores",
    threshold: float | None = None,
) -> Path:
    """Genuine / impostor cosine-score histograms (densities) in one PNG."""
    plt = _plt()
    path = Path(path)
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(-1, 1, 101).tolist()
    ax.hist(scores[~labels], bins=bins, density=True, alpha=0.55, label=f"impostor ({(~labels).sum()})")
    ax.hist(scores[labels], bins=bins, density=True, alpha=0.55, label=f"genuine ({labels.sum()})")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.3f}")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend()
    _save(fig, path)
    plt.close(fig)
    return path


def _fmt_far(far: float) -> str:
    return f"{far:.0e}".replace("e-0", "e-")


def markdown_table(rows: Mapping[str, Mapping[str, Any]], fars: Sequence[float] = (1e-4, 1e-3)) -> str:
    """Markdown table: set | accuracy ± std | threshold | AUC | TAR@FAR... (missing keys shown as '-')."""
    head = ["set", "accuracy (%)", "threshold", "AUC"] + [f"TAR@FAR={_fmt_far(f)} (%)" for f in fars]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        acc = f"{100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f}" if "accuracy" in r else "-"
        thr = f"{r['threshold']:.3f}" if "threshold" in r else "-"
        auc = f"{r['auc']:.4f}" if "auc" in r else "-"
        tars = r.get("tar_at_far", {})
        cells = [f"{100 * tars[f]:.2f}" if f in tars else "-" for f in (float(x) for x in fars)]
        lines.append("| " + " | ".join([name, acc, thr, auc] + cells) + " |")
    return "\n".join(lines) + "\n"


def _jsonable(obj):
    if isinstance(obj, dict):
        return {(_fmt_far(k) if isinstance(k, float) else str(k)): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    return obj


def write_json(obj: object, path: Union[str, Path]) -> Path:
    """JSON with float dict keys (FARs) written as '1e-3'-style strings; atomic."""
    path = Path(path)
    with atomic_open(path, "wb") as f:
        f.write((json.dumps(_jsonable(obj), indent=2) + "\n").encode())
    return path


def write_text(text: str, path: Union[str, Path]) -> Path:
    path = Path(path)
    with atomic_open(path, "wb") as f:
        f.write(text.encode())
    return path


def downsample_curve(fpr: np.ndarray, tpr: np.ndarray, n: int = 200) -> Dict[str, list]:
    """A JSON-sized ROC: points at log-spaced FARs (the max TPR with FPR <= each)."""
    fpr = np.asarray(fpr)
    tpr = np.asarray(tpr)
    lo = max(float(np.min(fpr[fpr > 0], initial=1.0)), 1e-8)
    grid = np.unique(np.concatenate([np.logspace(np.log10(lo), 0, n), [1.0]]))
    idx = np.searchsorted(fpr, grid, side="right") - 1  # fpr is non-decreasing
    return {"far": grid.tolist(), "tar": tpr[np.clip(idx, 0, None)].tolist()}
