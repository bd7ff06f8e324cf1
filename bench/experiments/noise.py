"""Does UNPG help, and do gathered (global) negatives help? The synthetic open-set benchmark.

Protocol (issue #7, docs/RESULTS.md):
- data: ``data_tools synth`` (DATA below), the same images at label noise 0 % and
  20 %; verification on identities never seen in training: the ``val.bin`` pairs
  (10-fold accuracy) and an all-pairs gallery of those identities (TAR@FAR 1e-3 /
  1e-4 need many impostor pairs: GALLERY_IMAGES per identity gives ~500k).
- training: configs/experiment.yaml (tiny CNN, 2 ranks via torchrun, identical steps
  and schedule for every arm); arms differ only in ``loss.*`` keys (ARMS).
- 3 seeds per arm; report mean ± std. Nothing here is tuned on the held-out pairs.

    python -m bench.experiment                       # the whole grid (~33 runs x ~3 min)
    python -m bench.experiment --group core --noise 0.2 --seeds 0
    python -m bench.experiment --report-only         # table + plots from finished runs
Finished runs are skipped, so the grid can be run in parts. (``python -m bench.experiments.noise``
is the same; ``bench/experiment.py`` also dispatches ``--group ratio`` to bench/experiments/ratio.py.)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from bench.experiments.core import ROOT, load_model, synth_gallery, train, val_accuracy

DATA: Dict[str, Any] = dict(identities=300, images_per_identity=20, seed=0, val_identities=100, val_pairs=1000)
GALLERY_IMAGES = 10  # per held-out identity: 100 x 10 images -> 4,500 genuine / 495,000 impostor pairs
FARS = (1e-3, 1e-4)
GROUPS = ("core", "ablation", "state", "all")

# name -> (group, loss overrides, noise levels)
ARMS: Dict[str, tuple] = {
    "arcface": ("core", dict(margin="arcface", m=0.3, unpg=False), (0.0, 0.2)),
    "arcface+unpg": ("core", dict(margin="arcface", m=0.3, unpg=True, wisk=1.5), (0.0, 0.2)),
    "cosface": ("core", dict(margin="cosface", m=0.2, unpg=False), (0.0, 0.2)),
    "cosface+unpg": ("core", dict(margin="cosface", m=0.2, unpg=True, wisk=1.5), (0.0, 0.2)),
    "arcface+unpg local-negatives": ("ablation", dict(margin="arcface", m=0.3, unpg=True, wisk=1.5,
                                                      negatives="local"), (0.2,)),
    "arcface+unpg wisk1.0": ("ablation", dict(margin="arcface", m=0.3, unpg=True, wisk=1.0), (0.2,)),
    "arcface+unpg pfc0.3": ("ablation", dict(margin="arcface", m=0.3, unpg=True, wisk=1.5,
                                             sample_rate=0.3), (0.2,)),
    # issue 26: the core "arcface+unpg" arm with its centres and momentum stored in bf16
    "arcface+unpg bf16-state": ("state", dict(margin="arcface", m=0.3, unpg=True, wisk=1.5,
                                              state_dtype="bf16"), (0.0,)),
}


def _slug(arm: str, noise: float, seed: int) -> str:
    return f"{arm.replace('+', '_').replace(' ', '_')}__noise{int(noise * 100)}__seed{seed}"


def make_data(out: Path, noise: float) -> Path:
    from data_tools.synth import generate_dataset

    d = out / "data" / f"noise{int(noise * 100)}"
    if not (d / "val.bin").is_file():
        print(f"generating {d} ...", flush=True)
        generate_dataset(d, label_noise=noise, **DATA)
    return d


def make_gallery(out: Path) -> tuple:
    """Images of the held-out identities (never in training) with their identity."""
    images, labels, _ = synth_gallery(out / "data" / "gallery.pt", DATA["seed"], DATA["identities"],
                                      DATA["val_identities"], GALLERY_IMAGES, dict(family_size=1, family_spread=1.0))
    return images, labels


def evaluate(run: Path, data_dir: Path, gallery) -> dict:
    from eval.metrics import roc, tar_at_far
    from trainer.verification_protocol import embed_images

    model = load_model(run / "model.pt")
    acc = val_accuracy(model, data_dir)
    g_images, g_labels = gallery
    emb = embed_images(model, g_images, progress=False).double().numpy()
    iu = np.triu_indices(len(g_labels), k=1)
    scores = (emb @ emb.T)[iu]
    same = (g_labels.numpy()[:, None] == g_labels.numpy()[None, :])[iu]
    tars = tar_at_far(scores, same, FARS)
    fpr, tpr, auc = roc(scores, same)
    keep = np.unique(np.r_[np.searchsorted(fpr, np.logspace(-6, 0, 200)), len(fpr) - 1].clip(0, len(fpr) - 1))
    summary = json.loads((run / "summary.json").read_text())
    return {"accuracy": float(acc), "tar_at_far": {str(k): v for k, v in tars.items()}, "auc": auc,
            "roc": {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist()},
            "loss": [h["loss"] for h in summary["history"]],
            "kept_fraction": [h.get("kept_fraction") for h in summary["history"]]}


def report(out: Path, results: Dict[tuple, dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| arm | noise | runs | TAR@FAR=1e-3 | TAR@FAR=1e-4 | val.bin accuracy | AUC |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    groups: Dict[tuple, List[dict]] = {}
    for (arm, noise, _seed), r in sorted(results.items()):
        groups.setdefault((arm, noise), []).append(r)

    def ms(vals):
        return f"{100 * np.mean(vals):.2f} ± {100 * np.std(vals):.2f}"

    for arm in ARMS:
        for noise in (0.0, 0.2):
            rs = groups.get((arm, noise))
            if not rs:
                continue
            lines.append(f"| {arm} | {int(noise * 100)}% | {len(rs)} | "
                         f"{ms([r['tar_at_far']['0.001'] for r in rs])} | "
                         f"{ms([r['tar_at_far']['0.0001'] for r in rs])} | "
                         f"{ms([r['accuracy'] for r in rs])} | {ms([r['auc'] for r in rs])} |")
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    for noise in (0.0, 0.2):
        fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
        for arm in ARMS:
            rs = groups.get((arm, noise))
            if not rs:
                continue
            r = rs[0]  # seed 0 (first finished) for the curves
            axes[0].semilogx(np.maximum(r["roc"]["fpr"], 1e-6), r["roc"]["tpr"], label=arm)
            axes[1].plot(np.convolve(r["loss"], np.ones(10) / 10, mode="valid"), label=arm)
            kf = [k for k in r["kept_fraction"] if k is not None]
            if kf:
                axes[2].plot(kf, label=arm)
        axes[0].set(xlabel="FAR", ylabel="TAR", title=f"ROC, held-out gallery, noise {int(noise * 100)}%",
                    xlim=(1e-5, 1))
        axes[1].set(xlabel="step", ylabel="loss (10-step mean)", title="training loss")
        axes[2].set(xlabel="step", ylabel="kept / negative pairs", title="UNPG kept-negative fraction")
        for a in axes:
            a.grid(alpha=0.3)
            a.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"noise{int(noise * 100)}.png", dpi=90)
        plt.close(fig)
    return table


def add_args(ap: argparse.ArgumentParser) -> None:
    """This study's options (bench/experiment.py adds the ratio sweep's beside them)."""
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "experiment")
    ap.add_argument("--arms", nargs="*", help=f"subset of: {list(ARMS)}")
    ap.add_argument("--noise", type=float, nargs="*", default=[0.0, 0.2])
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--report-only", action="store_true")


def run(args: argparse.Namespace) -> None:
    """The arms of ``args.group`` (default all) x noise x seeds; then the table and plots."""
    args.out.mkdir(parents=True, exist_ok=True)
    group = getattr(args, "group", "all")
    arms = args.arms or [a for a, (g, _, _) in ARMS.items() if group in ("all", g)]
    todo = [(a, n, s) for a in arms for n in ARMS[a][2] if n in args.noise for s in args.seeds]
    if not args.report_only:
        gallery = make_gallery(args.out)
        for i, (arm, noise, seed) in enumerate(todo, 1):
            run_dir = args.out / "runs" / _slug(arm, noise, seed)
            if (run_dir / "metrics.json").is_file():
                continue
            data_dir = make_data(args.out, noise)
            t0 = time.time()
            train(run_dir, data_dir, seed, ARMS[arm][1])
            metrics = evaluate(run_dir, data_dir, gallery)
            metrics.update(arm=arm, noise=noise, seed=seed, seconds=time.time() - t0)
            (run_dir / "metrics.json").write_text(json.dumps(metrics))
            print(f"[{i}/{len(todo)}] {arm} noise {noise} seed {seed}: "
                  f"TAR@1e-3 {metrics['tar_at_far']['0.001']:.4f} TAR@1e-4 {metrics['tar_at_far']['0.0001']:.4f} "
                  f"acc {metrics['accuracy']:.4f} ({metrics['seconds']:.0f} s)", flush=True)
    results = {}
    for p in sorted((args.out / "runs").glob("*/metrics.json")):
        m = json.loads(p.read_text())
        results[(m["arm"], m["noise"], m["seed"])] = m
    print(report(args.out, results))
    print(f"\nplots: {args.out}/noise0.png, {args.out}/noise20.png")


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.experiments.noise", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", choices=GROUPS, default="all")
    add_args(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    run(args)


if __name__ == "__main__":
    main()
