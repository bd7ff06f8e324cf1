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
    python -m bench.experiment --group ratio --ids 300 --families on --seeds 0 --baseline paper
                                                     # a part of the pairs:classes sweep (issue #16)
    python -m bench.experiment --family-grid docs/results/family_grid.png
Finished runs are skipped, so the grid can be run in parts.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

ROOT = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
import torch  # noqa: E402

DATA = dict(identities=300, images_per_identity=20, seed=0, val_identities=100, val_pairs=1000)
GALLERY_IMAGES = 10  # per held-out identity: 100 x 10 images -> 4,500 genuine / 495,000 impostor pairs
BACKBONE, EMB = "tiny", 128  # must match configs/experiment.yaml
FARS = (1e-3, 1e-4)

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
    path = out / "data" / "gallery.pt"
    if not path.is_file():
        import simplejpeg

        from data_tools.synth import make_image
        from trainer.io.atomic import atomic_torch_save

        ids = range(DATA["identities"], DATA["identities"] + DATA["val_identities"])
        images, labels = [], []
        for ident in ids:
            for k in range(GALLERY_IMAGES):
                img = simplejpeg.decode_jpeg(make_image(DATA["seed"], ident, 10_000 + k), colorspace="RGB")
                images.append(torch.from_numpy(img).permute(2, 0, 1))
                labels.append(ident)
        atomic_torch_save({"images": torch.stack(images), "labels": torch.tensor(labels)}, path)
    g = torch.load(path)
    return g["images"], g["labels"]


def train(run: Path, data_dir: Path, seed: int, loss: dict, config: str = "configs/experiment.yaml",
          extra: Sequence[str] = ()) -> None:
    overrides = [f"run.output={run}", f"data.train_dir={data_dir}", f"run.seed={seed}", *extra]
    overrides += [f"loss.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in loss.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "trainer.train", config, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "stdout.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)


def evaluate(run: Path, data_dir: Path, gallery) -> dict:
    from eval.metrics import roc, tar_at_far, verify_embeddings
    from trainer.backbones import get_backbone
    from trainer.verification_protocol import embed_images, load_bin

    model = get_backbone(BACKBONE, num_features=EMB)
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    images, issame = load_bin(data_dir / "val.bin")
    acc = verify_embeddings(embed_images(model, images, progress=False), issame)["accuracy"]
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


# ---------------------------------------------------------------------------------------------
# --group ratio: when does UNPG help? Sweep pairs:classes at the paper's loss settings, with
# and without look-alike families (issue #16, docs/RESULTS.md "UNPG against the ratio of
# negative pairs to classes"). Fixed before any run; nothing here is tuned on held-out pairs.
# ---------------------------------------------------------------------------------------------
RATIO_CONFIG = "configs/experiment_ratio.yaml"
RATIO_GLOBAL_BATCH = 128  # 64 per rank x 2 ranks (configs/experiment_ratio.yaml), every arm
RATIO_PAIRS = RATIO_GLOBAL_BATCH * (RATIO_GLOBAL_BATCH - 1) // 2  # 8,128 pairs per step
RATIO_IDS = (300, 1500, 5000, 8000)  # 8000 optional (not in the default parts)
RATIO_DEFAULT_IDS = (300, 1500, 5000)
RATIO_IMAGES = 10  # training images per identity, every count
#: optimizer steps per identity count (equal for every arm of a count); the loss-flattening
#: criterion (ratio_flat) is checked and reported, not used to stop runs
RATIO_STEPS = {300: 400, 1500: 500, 5000: 600, 8000: 700}
RATIO_FAMILY = dict(family_size=4, family_spread=0.25)  # "families on"; off: family_size 1
RATIO_VAL_IDS = 300  # held-out identities in val.bin (10-fold accuracy), after the training ones
RATIO_VAL_PAIRS = 600
#: the held-out gallery (TAR@FAR): RATIO_GALLERY_IDS identities from RATIO_GALLERY_FIRST on (never
#: trained on at any count, whole families), RATIO_GALLERY_IMAGES images each, all pairs
RATIO_GALLERY_FIRST, RATIO_GALLERY_IDS, RATIO_GALLERY_IMAGES = 100_000, 300, 16
RATIO_SEEDS = (0, 1, 2)  # training seeds; the data (seed 0) is fixed
#: name -> (baseline set, loss overrides). "paper": s = 64, ArcFace m = 0.5 (the paper's);
#: "working": the earlier study's smaller m = 0.3 at the same s = 64 (the working-baseline rule)
RATIO_ARMS: Dict[str, tuple] = {
    "arcface": ("paper", dict(margin="arcface", s=64.0, m=0.5, unpg=False)),
    "arcface+unpg wisk1.0": ("paper", dict(margin="arcface", s=64.0, m=0.5, unpg=True, wisk=1.0)),
    "arcface+unpg wisk1.5": ("paper", dict(margin="arcface", s=64.0, m=0.5, unpg=True, wisk=1.5)),
    "arcface m0.3": ("working", dict(margin="arcface", s=64.0, m=0.3, unpg=False)),
    "arcface m0.3+unpg wisk1.0": ("working", dict(margin="arcface", s=64.0, m=0.3, unpg=True, wisk=1.0)),
    "arcface m0.3+unpg wisk1.5": ("working", dict(margin="arcface", s=64.0, m=0.3, unpg=True, wisk=1.5)),
    # "recipe": the earlier study's whole loss setting (s = 32, m = 0.3), added after the planned working
    # baseline (m = 0.3 at s = 64) also ended at its L0 (docs/RESULTS.md says why and when)
    "arcface s32 m0.3": ("recipe", dict(margin="arcface", s=32.0, m=0.3, unpg=False)),
    "arcface s32 m0.3+unpg wisk1.0": ("recipe", dict(margin="arcface", s=32.0, m=0.3, unpg=True, wisk=1.0)),
    "arcface s32 m0.3+unpg wisk1.5": ("recipe", dict(margin="arcface", s=32.0, m=0.3, unpg=True, wisk=1.5)),
}
RATIO_PLAIN = {"paper": "arcface", "working": "arcface m0.3", "recipe": "arcface s32 m0.3"}
RATIO_TRAINS = 0.9  # an arm trains when its final loss (mean of the last 10 % of steps) < 0.9 x its start
#: added after seed 0 (see docs/RESULTS.md): a run "ends near L0" when its final loss is above 0.9 x the
#: loss of all-orthogonal embeddings (ratio_orthogonal_loss); the 0.9 rule above counts such runs as training
RATIO_STALL = 0.9
RATIO_FLAT = 0.02  # ... and has flattened when that mean is within 2 % of the mean of the 10 % before


def ratio_fam(families: bool) -> dict:
    return dict(RATIO_FAMILY) if families else dict(family_size=1, family_spread=1.0)


def ratio_data(out: Path, ids: int, families: bool) -> Path:
    from data_tools.synth import generate_dataset

    d = out / "data" / f"ids{ids}_fam{'on' if families else 'off'}"
    if not (d / "val.bin").is_file():
        print(f"generating {d} ...", flush=True)
        f = ratio_fam(families)
        generate_dataset(d, ids, RATIO_IMAGES, seed=0, val_identities=RATIO_VAL_IDS, val_pairs=RATIO_VAL_PAIRS,
                         family_size=f["family_size"], family_spread=f["family_spread"], val_family_share=0.5)
    return d


def ratio_gallery(out: Path, families: bool) -> tuple:
    """(uint8 images NCHW, identity labels, family labels) of the held-out gallery."""
    path = out / "data" / f"gallery_fam{'on' if families else 'off'}.pt"
    if not path.is_file():
        import simplejpeg

        from data_tools.synth import family_of, make_pixels
        from trainer.io.atomic import atomic_torch_save

        f = ratio_fam(families)
        ids = np.arange(RATIO_GALLERY_FIRST, RATIO_GALLERY_FIRST + RATIO_GALLERY_IDS)
        images, labels = [], []
        for ident in ids:
            for k in range(RATIO_GALLERY_IMAGES):
                jpg = simplejpeg.encode_jpeg(make_pixels(0, int(ident), 10_000 + k, **f), quality=90, colorspace="RGB")
                images.append(torch.from_numpy(simplejpeg.decode_jpeg(jpg, colorspace="RGB")).permute(2, 0, 1))
                labels.append(int(ident))
        labels = torch.tensor(labels)
        atomic_torch_save({"images": torch.stack(images), "labels": labels,
                           "families": torch.from_numpy(np.asarray(family_of(labels.numpy(), f["family_size"])))}, path)
    g = torch.load(path, weights_only=True)
    return g["images"], g["labels"], g["families"]


def ratio_slug(ids: int, families: bool, arm: str, seed: int) -> str:
    return f"ids{ids}__fam{'on' if families else 'off'}__{arm.replace('+', '_').replace(' ', '_')}__seed{seed}"


def ratio_loss_stats(loss: Sequence[float]) -> dict:
    """Start (mean of the first 10 steps), end (mean of the last 10 %), the 10 % before, trains / flat."""
    loss = np.asarray(loss, dtype=np.float64)
    w = max(1, len(loss) // 10)
    start, end, before = loss[:10].mean(), loss[-w:].mean(), loss[-2 * w:-w].mean()
    return {"start": float(start), "end": float(end), "trains": bool(end < RATIO_TRAINS * start),
            "flat": bool(before - end < RATIO_FLAT * abs(before))}


def ratio_evaluate(run: Path, data_dir: Path, gallery) -> dict:
    """val.bin accuracy; TAR@FAR on all gallery pairs and on genuine + within-family impostors."""
    from eval.metrics import tar_at_far, verify_embeddings
    from trainer.backbones import get_backbone
    from trainer.verification_protocol import embed_images, load_bin

    model = get_backbone(BACKBONE, num_features=EMB)
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    images, issame = load_bin(data_dir / "val.bin")
    acc = verify_embeddings(embed_images(model, images, progress=False), issame)["accuracy"]
    g_images, g_labels, g_fams = gallery
    emb = embed_images(model, g_images, progress=False).float()
    emb = torch.nn.functional.normalize(emb, dim=1).numpy()
    iu = np.triu_indices(len(g_labels), k=1)
    scores = (emb @ emb.T)[iu]
    lab, fam = g_labels.numpy(), g_fams.numpy()
    same = lab[iu[0]] == lab[iu[1]]
    within = ~same & (fam[iu[0]] == fam[iu[1]])
    del iu
    res = {"accuracy": float(acc), "tar_at_far": {str(k): v for k, v in tar_at_far(scores, same, FARS).items()},
           "pairs": {"genuine": int(same.sum()), "impostor": int((~same).sum()), "within_family": int(within.sum())}}
    if within.any():
        keep = same | within
        res["tar_at_far_within_family"] = {str(k): v for k, v in tar_at_far(scores[keep], same[keep], FARS).items()}
    summary = json.loads((run / "summary.json").read_text())
    res["loss"] = [h["loss"] for h in summary["history"]]
    res["kept_fraction"] = [h.get("kept_fraction") for h in summary["history"]]
    res.update(ratio_loss_stats(res["loss"]))
    return res


def orthogonal_loss(classes: int, s: float, m: float, pairs: float = 0.0) -> float:
    """L0: the ArcFace (+ UNPG) loss of embeddings orthogonal to every centre and to each other.

    Every cosine is 0: the target logit is s cos(pi/2 + m) = -s sin m, each of the C - 1
    other centres and each of the P kept negative pairs adds exp(0) = 1 to the denominator:
    L0 = log(C - 1 + P + exp(-s sin m)) + s sin m.
    """
    sm = s * math.sin(m)
    return math.log(classes - 1 + pairs + math.exp(-sm)) + sm


def ratio_orthogonal_loss(r: dict) -> float:
    """L0 of a sweep run, P = its mean kept pairs over the last 10 % of steps (0 without UNPG).

    A run whose loss ends near L0 has learned little beyond pushing everything apart; a
    loss-only check, independent of held-out pairs.
    """
    loss = RATIO_ARMS[r["arm"]][1]
    pairs = 0.0
    if loss["unpg"]:
        kept = [k for k in r.get("kept_fraction") or [] if k is not None]
        w = max(1, len(kept) // 10)
        pairs = RATIO_PAIRS * float(np.mean(kept[-w:])) if kept else float(RATIO_PAIRS)
    return orthogonal_loss(r["ids"], loss["s"], loss["m"], pairs)


def _sd(vals) -> float:
    """Sample standard deviation over seeds (ddof 1; 0 for a single value)."""
    return float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def ratio_report(out: Path, results: Dict[tuple, dict], doc_dir: Path) -> str:
    """Aggregate table (mean ± std over seeds), the gain plot and the loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def ms(vals, scale=100.0):
        vals = [v for v in vals if v is not None]
        return f"{scale * np.mean(vals):.2f} ± {scale * _sd(vals):.2f}" if vals else "-"

    cells: Dict[tuple, List[dict]] = {}
    for (ids, fam, arm, _seed), r in sorted(results.items()):
        cells.setdefault((ids, fam, arm), []).append(r)
    lines = ["| ids | pairs:classes | families | arm | runs | steps | loss start -> end | end / L0 | trains / flat | "
             "TAR@1e-3 | TAR@1e-4 | within-family TAR@1e-3 | within-family TAR@1e-4 | val.bin acc |",
             "| " + " | ".join(["---"] * 14) + " |"]
    for ids in RATIO_IDS:
        for fam in (False, True):
            for arm in RATIO_ARMS:
                rs = cells.get((ids, fam, arm))
                if not rs:
                    continue
                trains = sum(r["trains"] for r in rs)
                flat = sum(r["flat"] for r in rs)
                end_l0 = [r["end"] / ratio_orthogonal_loss(r) for r in rs]
                stalls = sum(v > RATIO_STALL for v in end_l0)
                flag = (f"{trains}/{len(rs)} / {flat}/{len(rs)}" + (" **DOES NOT TRAIN**" if trains < len(rs) else "")
                        + (f" **ends near L0 ({stalls}/{len(rs)})**" if stalls else ""))
                wf = [r.get("tar_at_far_within_family") for r in rs]
                lines.append(
                    f"| {ids} | {RATIO_PAIRS / ids:.1f}:1 | {'on' if fam else 'off'} | {arm} | {len(rs)} | "
                    f"{len(rs[0]['loss'])} | {np.mean([r['start'] for r in rs]):.2f} -> "
                    f"{np.mean([r['end'] for r in rs]):.2f} | {np.mean(end_l0):.2f} | {flag} | "
                    f"{ms([r['tar_at_far']['0.001'] for r in rs])} | {ms([r['tar_at_far']['0.0001'] for r in rs])} | "
                    f"{ms([w['0.001'] if w else None for w in wf])} | {ms([w['0.0001'] if w else None for w in wf])} | "
                    f"{ms([r['accuracy'] for r in rs])} |"
                )
    # UNPG gain in TAR@FAR=1e-4 over the plain arm of the same baseline set, paired by seed
    gain_lines = [
        "| ids | pairs:classes | families | UNPG arm | vs | seeds | gain TAR@1e-3 (all) | gain TAR@1e-4 (all) | "
        "UNPG better at 1e-4 | gain TAR@1e-3 (within-family) | gain TAR@1e-4 (within-family) | gain val.bin acc |",
        "| " + " | ".join(["---"] * 12) + " |",
    ]
    series: Dict[tuple, list] = {}
    for ids in RATIO_IDS:
        for fam in (False, True):
            for arm, (bset, loss) in RATIO_ARMS.items():
                if not loss["unpg"]:
                    continue
                plain = RATIO_PLAIN[bset]
                pr = {s: results[(ids, fam, plain, s)] for (i, f, a, s) in results if (i, f, a) == (ids, fam, plain)}
                ur = {s: results[(ids, fam, arm, s)] for (i, f, a, s) in results if (i, f, a) == (ids, fam, arm)}
                seeds = sorted(set(pr) & set(ur))
                if not seeds:
                    continue
                def diff(key, far, s, ur=ur, pr=pr):
                    return ur[s][key][far] - pr[s][key][far]

                g = [diff("tar_at_far", "0.0001", s) for s in seeds]
                g3 = [diff("tar_at_far", "0.001", s) for s in seeds]
                wf = [s for s in seeds if "tar_at_far_within_family" in ur[s]]
                gw = [diff("tar_at_far_within_family", "0.0001", s) for s in wf]
                gw3 = [diff("tar_at_far_within_family", "0.001", s) for s in wf]
                ga = [ur[s]["accuracy"] - pr[s]["accuracy"] for s in seeds]
                gain_lines.append(f"| {ids} | {RATIO_PAIRS / ids:.1f}:1 | {'on' if fam else 'off'} | {arm} | {plain} | "
                                  f"{len(seeds)} | {ms(g3)} | {ms(g)} | {sum(v > 0 for v in g)}/{len(g)} | "
                                  f"{ms(gw3) if gw else '-'} | {ms(gw) if gw else '-'} | {ms(ga)} |")
                series.setdefault((fam, arm), []).append((RATIO_PAIRS / ids, 100 * np.mean(g), 100 * _sd(g)))
    # the budget actually spent per part (training + evaluation of every finished run)
    budget = [
        "| ids | families | runs | steps per run | train s per run (mean) | total min |",
        "| " + " | ".join(["---"] * 6) + " |",
    ]
    for ids in RATIO_IDS:
        for fam in (False, True):
            rs = [r for (i, f, _, _), r in results.items() if (i, f) == (ids, fam)]
            if rs:
                budget.append(
                    f"| {ids} | {'on' if fam else 'off'} | {len(rs)} | {rs[0]['steps']} | "
                    f"{np.mean([r['train_seconds'] for r in rs]):.0f} | {sum(r['seconds'] for r in rs) / 60:.1f} |"
                )
    total = sum(r["seconds"] for r in results.values()) / 60
    budget.append(f"| all | | {len(results)} | | | {total:.1f} |")
    table = "\n".join(lines) + "\n\n" + "\n".join(gain_lines) + "\n\n" + "\n".join(budget)
    (out / "ratio_results.md").write_text(table + "\n")
    # every run's metrics, one JSON line each (curves rounded), for the repository next to the plots
    doc_dir.mkdir(parents=True, exist_ok=True)
    with open(doc_dir / "ratio_runs.jsonl", "w") as fh:
        for _key, r in sorted(results.items()):
            row = {k: v for k, v in r.items() if k != "roc"}
            row["loss"] = [round(v, 4) for v in r["loss"]]
            kept = [v for v in r.get("kept_fraction") or [] if v is not None]
            row["kept_fraction"] = [round(v, 5) for v in kept] if kept else None  # None: no UNPG
            fh.write(json.dumps(row, sort_keys=True) + "\n")
    # one panel per baseline set (paper: m = 0.5; working: m = 0.3), one line per (families, wisk)
    sets = [b for b in RATIO_PLAIN if any(RATIO_ARMS[a][0] == b for (_, a) in series)]
    fig, axes = plt.subplots(1, max(1, len(sets)), figsize=(7.0 * max(1, len(sets)), 4.6), squeeze=False)
    for ax, bset in zip(axes[0], sets):
        for (fam, arm), pts in sorted(series.items()):
            if RATIO_ARMS[arm][0] != bset:
                continue
            wisk = RATIO_ARMS[arm][1]["wisk"]
            x, y, e = (np.asarray(v) for v in zip(*sorted(pts)))
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, color="C0" if wisk == 1.0 else "C1",
                        label=f"wisk {wisk}, families {'on' if fam else 'off'}", linestyle="-" if fam else "--")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlim(0.8, 40)
        m = RATIO_ARMS[RATIO_PLAIN[bset]][1]["m"]
        ax.set(xlabel="negative pairs per step : classes", ylabel="UNPG gain in TAR@FAR=1e-4 (points, ± std)",
               title=f"ArcFace s={RATIO_ARMS[RATIO_PLAIN[bset]][1]['s']:g} m={m} ({bset}): UNPG minus plain, by seed")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    doc_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(doc_dir / "ratio_gain.png", dpi=90)
    plt.close(fig)
    # every arm's loss curve (every seed): one panel per (ids, families), rows = families off / on;
    # dotted: L0 of each plain arm (all-orthogonal embeddings, ratio_orthogonal_loss)
    ids_done = sorted({i for (i, _, _, _) in results})
    fams_done = sorted({f for (_, f, _, _) in results})
    if results:
        fig, axes = plt.subplots(len(fams_done), len(ids_done), figsize=(4.6 * len(ids_done), 3.4 * len(fams_done)),
                                 squeeze=False)
        for row, fam in enumerate(fams_done):
            for col, ids in enumerate(ids_done):
                ax = axes[row][col]
                for j, arm in enumerate(RATIO_ARMS):
                    runs = [r for (i, f, a, _), r in sorted(results.items()) if (i, f, a) == (ids, fam, arm)]
                    for k, r in enumerate(runs):
                        ax.plot(r["loss"], color=f"C{j}", lw=0.6, alpha=0.7, label=arm if k == 0 else None)
                    if runs and not RATIO_ARMS[arm][1]["unpg"]:
                        ax.axhline(ratio_orthogonal_loss(runs[0]), color=f"C{j}", ls=":", lw=1.2,
                                   label=f"L0 of {arm}")
                ax.set(title=f"{ids} ids ({RATIO_PAIRS / ids:.1f}:1), families {'on' if fam else 'off'}",
                       xlabel="step", ylabel="training loss")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(doc_dir / "ratio_loss.png", dpi=72)
        plt.close(fig)
    return table


def family_grid(path: Path, members: int = 4, images: int = 5, identity: int = RATIO_GALLERY_FIRST) -> None:
    """A PNG grid of one family: ``members`` rows (identities) x ``images`` columns."""
    from PIL import Image

    from data_tools.synth import SIZE, make_pixels

    first = identity - identity % RATIO_FAMILY["family_size"]
    grid = np.zeros((members * SIZE, images * SIZE, 3), np.uint8)
    for r in range(members):
        for c in range(images):
            grid[r * SIZE : (r + 1) * SIZE, c * SIZE : (c + 1) * SIZE] = make_pixels(
                0, first + r, 10_000 + c, **RATIO_FAMILY
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


def ratio_main(args) -> None:
    from trainer.io.atomic import atomic_open

    ids_list = args.ids or list(RATIO_DEFAULT_IDS)
    fams = [f == "on" for f in (args.families or ["off", "on"])]
    baseline = args.baseline or ["auto"]
    seeds = args.seeds

    def plan(sets):
        arms = args.arms or [a for a, (b, _) in RATIO_ARMS.items() if b in sets]
        return [(i, f, a, s) for i in ids_list for f in fams for s in seeds for a in arms]

    def working_needed(ids, fam):
        """The working-baseline rule: a cell gets the m = 0.3 arms when a paper plain run did not train."""
        cell = ratio_slug(ids, fam, RATIO_PLAIN["paper"], 0).rsplit("__seed", 1)[0]
        for p in (args.out / "runs").glob(f"{cell}__seed*/metrics.json"):
            if not json.loads(p.read_text())["trains"]:
                return True
        return False

    if not args.report_only:
        t_all = time.time()
        # auto: the paper arms first, then the working arms, each skipped below unless the rule asks for it
        todo = plan(["paper"]) + plan(["working"]) if "auto" in baseline else plan(baseline)
        todo = list(dict.fromkeys(todo))  # --arms makes both plans the same list
        for n, (ids, fam, arm, seed) in enumerate(todo, 1):
            if "auto" in baseline and RATIO_ARMS[arm][0] == "working" and not working_needed(ids, fam):
                continue
            run = args.out / "runs" / ratio_slug(ids, fam, arm, seed)
            if (run / "metrics.json").is_file():
                continue
            data_dir = ratio_data(args.out, ids, fam)
            gallery = ratio_gallery(args.out, fam)
            steps = args.max_steps or RATIO_STEPS[ids]
            t0 = time.time()
            train(run, data_dir, seed, RATIO_ARMS[arm][1], config=RATIO_CONFIG, extra=[f"run.max_steps={steps}"])
            t_train = time.time() - t0
            m = ratio_evaluate(run, data_dir, gallery)
            m.update(ids=ids, families=fam, arm=arm, seed=seed, steps=steps, train_seconds=t_train,
                     seconds=time.time() - t0)
            with atomic_open(run / "metrics.json", "w") as fh:
                json.dump(m, fh)
            wf = m.get("tar_at_far_within_family", {}).get("0.0001")
            print(
                f"[{n}/{len(todo)}] ids {ids} fam {'on' if fam else 'off'} {arm} seed {seed}: loss {m['start']:.2f} -> "
                f"{m['end']:.2f} (trains {m['trains']}, flat {m['flat']}) TAR@1e-4 {m['tar_at_far']['0.0001']:.4f}"
                + (f" within-family {wf:.4f}" if wf is not None else "")
                + f" acc {m['accuracy']:.4f} (train {t_train:.0f} s, total {m['seconds']:.0f} s)",
                flush=True,
            )
        print(f"wall time of this invocation: {time.time() - t_all:.0f} s", flush=True)
    results = {}
    for p in sorted((args.out / "runs").glob("ids*/metrics.json")):
        m = json.loads(p.read_text())
        results[(m["ids"], m["families"], m["arm"], m["seed"])] = m
    print(ratio_report(args.out, results, args.doc_dir))
    print(f"\nplots: {args.doc_dir}/ratio_gain.png, {args.doc_dir}/ratio_loss.png; table: {args.out}/ratio_results.md")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "experiment")
    ap.add_argument("--group", choices=["core", "ablation", "state", "all", "ratio"], default="all",
                    help="ratio: the pairs:classes sweep (its own grid and output folder; not in 'all')")
    ap.add_argument("--arms", nargs="*", help=f"subset of: {list(ARMS)} (ratio: {list(RATIO_ARMS)})")
    ap.add_argument("--noise", type=float, nargs="*", default=[0.0, 0.2])
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--report-only", action="store_true")
    ratio = ap.add_argument_group("--group ratio")
    ratio.add_argument("--ids", type=int, nargs="*", choices=RATIO_IDS,
                       help=f"training identity counts (default {list(RATIO_DEFAULT_IDS)})")
    ratio.add_argument("--families", nargs="*", choices=["off", "on"], help="default: both")
    ratio.add_argument(
        "--baseline",
        nargs="*",
        choices=["auto", *RATIO_PLAIN],
        help="arm sets: paper (s=64 m=0.5), working (s=64 m=0.3), recipe (s=32 m=0.3), or auto (default): "
        "paper, plus working for the (ids, families) cells where a paper plain ArcFace run did not train",
    )
    ratio.add_argument("--max-steps", type=int, help="override the steps per count (pilots only: use another --out)")
    ratio.add_argument("--doc-dir", type=Path, default=ROOT / "docs" / "results",
                       help="where the ratio plots go (default docs/results)")
    ratio.add_argument("--family-grid", type=Path, help="only write the PNG grid of one family (4 x 5) here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.family_grid:
        family_grid(args.family_grid)
        print(f"wrote {args.family_grid}")
        return
    if args.group == "ratio":
        if args.out == ap.get_default("out"):
            args.out = ROOT / "bench_out" / "ratio"
        args.out.mkdir(parents=True, exist_ok=True)
        ratio_main(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)

    arms = args.arms or [a for a, (g, _, _) in ARMS.items() if args.group in ("all", g)]
    todo = [(a, n, s) for a in arms for n in ARMS[a][2] if n in args.noise for s in args.seeds]
    if not args.report_only:
        gallery = make_gallery(args.out)
        for i, (arm, noise, seed) in enumerate(todo, 1):
            run = args.out / "runs" / _slug(arm, noise, seed)
            if (run / "metrics.json").is_file():
                continue
            data_dir = make_data(args.out, noise)
            t0 = time.time()
            train(run, data_dir, seed, ARMS[arm][1])
            metrics = evaluate(run, data_dir, gallery)
            metrics.update(arm=arm, noise=noise, seed=seed, seconds=time.time() - t0)
            (run / "metrics.json").write_text(json.dumps(metrics))
            print(f"[{i}/{len(todo)}] {arm} noise {noise} seed {seed}: "
                  f"TAR@1e-3 {metrics['tar_at_far']['0.001']:.4f} TAR@1e-4 {metrics['tar_at_far']['0.0001']:.4f} "
                  f"acc {metrics['accuracy']:.4f} ({metrics['seconds']:.0f} s)", flush=True)
    results = {}
    for p in sorted((args.out / "runs").glob("*/metrics.json")):
        m = json.loads(p.read_text())
        results[(m["arm"], m["noise"], m["seed"])] = m
    print(report(args.out, results))
    print(f"\nplots: {args.out}/noise0.png, {args.out}/noise20.png")


if __name__ == "__main__":
    main()
