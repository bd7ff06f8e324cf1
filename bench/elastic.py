"""The same global batch measured both ways (issue 23, docs/launch.md "Elastic"): a 4-rank run,
and the same run that loses half its ranks at step K and goes on at 2 ranks with grad_accum 2
(``data.keep_global_batch``) from the checkpoint at K. Loss curves side by side and the final
held-out accuracy (the synthetic val.bin, 10-fold), paired by seed.

Plan, fixed before the first run (the constants below): synthetic faces (``data_tools synth``,
IDS identities x IMAGES images, seed 0, held-out VAL_IDS identities / VAL_PAIRS pairs), the demo
recipe (tiny CNN with BatchNorm, ArcFace s 32 m 0.3 + UNPG wisk 1.5, lr 0.1 with 20 warm-up
steps, poly decay), per-rank batch 16 on 4 ranks (global batch 64), STEPS steps, checkpoint
every K; the 4 -> 2 arm starts from the 4-rank run's own checkpoint at step K (so the first K
steps are the same run), seeds SEEDS; torch loader; gloo on CPU.

    python -m bench.elastic                     # both arms, every seed; writes docs/results/elastic/
    python -m bench.elastic --seeds 0 --steps 40   # a quicker look (not the documented numbers)

What is expected to differ (docs/launch.md): BatchNorm statistics per micro-batch are the same
size (16 images per rank either way), but UNPG's negative pairs come from each micro-batch's
gathered batch (32 images at 2 ranks, 64 at 4), so a step sees fewer pairs after the change.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
IDS, IMAGES, VAL_IDS, VAL_PAIRS = 200, 16, 60, 600
STEPS, K, SEEDS = 120, 40, (0, 1, 2)
BATCH, WORLD = 16, 4
OVERRIDES = ["model.backbone=tiny", "model.embedding_size=128", "loss.unpg=true", "loss.wisk=1.5",
             f"data.batch_size={BATCH}", "data.backend=torch", "data.num_threads=1", "engine.precision=fp32",
             "optim.lr=0.1", "optim.warmup_steps=20", "checkpoint.keep_last=100", "checkpoint.resume=auto",
             "logging.log_every=10", "logging.hist_every=0", "logging.image_grid=false",
             "logging.progress_bar=off", "validation.every=0", "validation.at_start=false",
             "validation.targets=[val]"]


def make_data(out: Path) -> Path:
    from data_tools.synth import generate_dataset

    d = out / "data"
    if not (d / "val.bin").is_file():
        generate_dataset(d, identities=IDS, images_per_identity=IMAGES, seed=0, label_noise=0.0,
                         val_identities=VAL_IDS, val_pairs=VAL_PAIRS, workers=1)
    return d


def run(out: Path, data: Path, nproc: int, seed: int, steps: int, every: int) -> Dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "trainer.train", "configs/synth_demo.yaml", *OVERRIDES, f"run.output={out}",
           f"data.train_dir={data}", f"validation.val_dir={data}", f"run.seed={seed}",
           f"run.max_steps={steps}", f"checkpoint.save_every={every}"]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=log,
                       stderr=subprocess.STDOUT, check=True)
    return json.loads((out / "summary.json").read_text())


def arms(work: Path, data: Path, seed: int, steps: int, k: int) -> Dict[str, Dict]:
    full = work / f"four_seed{seed}"
    if not (full / "summary.json").is_file():
        run(full, data, WORLD, seed, steps, k)
    half = work / f"four_to_two_seed{seed}"
    if not (half / "summary.json").is_file():
        shutil.rmtree(half, ignore_errors=True)
        (half / "checkpoints").mkdir(parents=True)
        src = full / "checkpoints" / f"step_{k:08d}"
        shutil.copytree(src, half / "checkpoints" / src.name)
        run(half, data, WORLD // 2, seed, steps, k)
    return {a: json.loads((work / f"{a}_seed{seed}" / "summary.json").read_text()) for a in ("four", "four_to_two")}


def losses(summary: Dict) -> List[float]:
    return [h["loss"] for h in summary["history"]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "bench_out" / "elastic")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "results" / "elastic")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--k", type=int, default=K)
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    data = make_data(a.work)
    rows, curves = [], {}
    for seed in a.seeds:
        r = arms(a.work / f"steps{a.steps}_k{a.k}", data, seed, a.steps, a.k)
        curves[seed] = {arm: losses(s) for arm, s in r.items()}
        acc = {arm: s["val"][-1]["acc"]["val"] for arm, s in r.items()}
        tail = {arm: float(np.mean(losses(s)[-10:])) for arm, s in r.items()}
        l0 = losses(r["four"])[0]
        rows.append((seed, l0, tail["four"], tail["four_to_two"], acc["four"], acc["four_to_two"]))
    lines = [f"4 ranks x {BATCH} vs 4 -> 2 ranks x {BATCH} with grad_accum 2 from step {a.k} "
             f"(global batch {BATCH * WORLD}), {a.steps} steps, torch loader, gloo CPU",
             "", "| seed | L0 | loss, last 10 steps: 4 ranks | 4 -> 2 | ratio "
             "| held-out acc: 4 ranks | 4 -> 2 | diff |",
             "|---|---|---|---|---|---|---|---|"]
    for seed, l0, t4, t2, a4, a2 in rows:
        lines.append(f"| {seed} | {l0:.3f} | {t4:.3f} | {t2:.3f} | {t2 / t4:.3f} | {a4:.4f} | {a2:.4f} "
                     f"| {a2 - a4:+.4f} |")
    d = np.array([r[5] - r[4] for r in rows])
    ratio = np.array([r[3] / r[2] for r in rows])
    lines += ["", f"paired held-out accuracy difference (4 -> 2 minus 4): {d.mean():+.4f} +- "
              f"{d.std(ddof=1) if d.size > 1 else 0.0:.4f} over {d.size} seed(s); "
              f"loss ratio (last 10 steps) {ratio.mean():.3f} +- {ratio.std(ddof=1) if ratio.size > 1 else 0.0:.3f}"]
    text = "\n".join(lines)
    print(text)
    a.docs.mkdir(parents=True, exist_ok=True)
    (a.docs / "summary.md").write_text(text + "\n")
    (a.docs / "curves.json").write_text(json.dumps({str(k): v for k, v in curves.items()}))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for seed, c in curves.items():
            ax.plot(range(1, len(c["four"]) + 1), c["four"], color=f"C{seed}", lw=1, label=f"4 ranks, seed {seed}")
            ax.plot(range(1, len(c["four_to_two"]) + 1), c["four_to_two"], color=f"C{seed}", lw=1, ls="--",
                    label=f"4 -> 2 at step {a.k}, seed {seed}")
        ax.axvline(a.k, color="grey", lw=0.5)
        ax.set_xlabel("optimizer step (global batch 64)")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(a.docs / "loss_curves.png", dpi=110)
    except ImportError:
        print("matplotlib not installed: no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
