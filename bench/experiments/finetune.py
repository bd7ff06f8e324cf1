"""The fine-tuning study (issue 22, docs/RESULTS.md "Fine-tuning"): does starting from a
pretrained model beat training from scratch on a small custom set in another domain, does
an imprinted head help, and does UNPG help when the baseline trains?

Plan, fixed before the first run (the constants below):
- source model: synthetic domain A (``data_tools synth``, seed 0), SOURCE_IDS identities x
  SOURCE_IMAGES, plain ArcFace s = 32, m = 0.3 (the earlier study's recipe, which trains at
  300 identities: docs/RESULTS.md), SOURCE_STEPS steps, saved as an insightface-format state
  dict (``model.pt``): the user's starting point. Its loss is shown against its L0.
- target "custom dataset": domain B (``--domain B``: another palette, light, texture and
  crops; docs/results/finetune_domains.png), new identities (seed 1), look-alike families
  (K = 4, spread 0.25), TARGET_IDS identities with 2 or 8 images each; held-out: GALLERY_IDS
  domain-B identities (whole families) x GALLERY_IMAGES images for TAR@FAR 1e-3 / 1e-4 on all
  pairs and on genuine + within-family impostor pairs, and a val.bin for 10-fold accuracy.
- arms (ARMS), STEPS optimizer steps each (equal within an images-per-identity setting),
  global batch 128 on 2 ranks, seeds 0-2: the source model as it is (zero-shot), from scratch
  (plain, + UNPG wisk 1.0), fine-tuned with a random or an imprinted head, each plain and
  + UNPG wisk 1.0 / 1.5; then bn_mode frozen / recalibrate for the fine-tune arm with the best
  mean TAR@1e-4 at 8 images (the rule is fixed here; which arm it picks is known only after).
- loss curves and end/L0 for every run; an arm whose final loss is above 0.9 x L0 is named
  as not training.

    python -m bench.finetune --grid docs/results/finetune_domains.png   # the domains, side by side
    python -m bench.finetune --part source                              # the source model
    python -m bench.finetune --part main --images 8 --seeds 0           # a part of the grid
    python -m bench.finetune --part bn --images 8 2                     # the BatchNorm arms
    python -m bench.finetune --report-only
Finished runs are skipped, so the study runs in parts; every finished run's metrics and the
source model are also written to docs/results/finetune/ (committed), and a later session
continues from them.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from bench.experiments import core

SOURCE: Dict[str, Any] = dict(identities=300, images_per_identity=30, seed=0, val_identities=100, val_pairs=600)
SOURCE_STEPS = 600
SOURCE_LOSS = dict(margin="arcface", s=32.0, m=0.3, unpg=False)
TARGET_IDS, TARGET_SEED = 2000, 1
FAMILY: Dict[str, Any] = dict(family_size=4, family_spread=0.25)
IMAGES = (2, 8)
GALLERY_FIRST, GALLERY_IDS, GALLERY_IMAGES = 100_000, 300, 16
STEPS = 300
SEEDS = (0, 1, 2)
CONFIG = "configs/finetune_bench.yaml"
FARS = (1e-3, 1e-4)
PAIRS = 128 * 127 // 2  # negative pairs per step of a global batch of 128 (UNPG's L0)
STALL = 0.9
FT = ["model.init_from={source}", "optim.lr=0.01", "optim.head_lr=0.1", "optim.freeze_backbone_steps=30"]
SCRATCH = ["optim.lr=0.1", "optim.head_lr=0.1"]
ARMS: Dict[str, tuple] = {
    "scratch": ("main", SCRATCH, dict(unpg=False)),
    "scratch+unpg1.0": ("main", SCRATCH, dict(unpg=True, wisk=1.0)),
    "ft random": ("main", FT, dict(unpg=False)),
    "ft random+unpg1.0": ("main", FT, dict(unpg=True, wisk=1.0)),
    "ft random+unpg1.5": ("main", FT, dict(unpg=True, wisk=1.5)),
    "ft imprint": ("main", FT + ["loss.head_init=imprint"], dict(unpg=False)),
    "ft imprint+unpg1.0": ("main", FT + ["loss.head_init=imprint"], dict(unpg=True, wisk=1.0)),
    "ft imprint+unpg1.5": ("main", FT + ["loss.head_init=imprint"], dict(unpg=True, wisk=1.5)),
}
BN_MODES = ("frozen", "recalibrate")


def domain_grid(out: Path, seed: int = 0, identities: int = 6, images: int = 4) -> Path:
    """The same identities in domain A (left) and B (right), one row each."""
    from data_tools.synth import make_pixels

    rows = []
    for t in range(identities):
        a = [make_pixels(seed, t, i, domain="A") for i in range(images)]
        b = [make_pixels(seed, t, i, domain="B") for i in range(images)]
        rows.append(a + [np.full_like(a[0][:, :8], 255)] + b)
    return core.save_grid(out, rows)


# ------------------------------------------------------------------ data
def source_data(out: Path) -> Path:
    from data_tools.synth import generate_dataset

    d = out / "data" / "source_A"
    if not (d / "val.bin").is_file():
        generate_dataset(d, **SOURCE)
    return d


def target_data(out: Path, images: int) -> Path:
    from data_tools.synth import generate_dataset

    d = out / "data" / f"target_B_{images}img"
    if not (d / "val.bin").is_file():
        print(f"generating {d} ...", flush=True)
        generate_dataset(d, TARGET_IDS, images, seed=TARGET_SEED, val_identities=100, val_pairs=600,
                         val_family_share=0.5, domain="B", **FAMILY)
    return d


def gallery(out: Path) -> tuple:
    """(uint8 NCHW images, identities, families) of the held-out domain-B gallery."""
    return core.synth_gallery(out / "data" / "gallery_B.pt", TARGET_SEED, GALLERY_FIRST, GALLERY_IDS, GALLERY_IMAGES,
                         FAMILY, domain="B")


# --------------------------------------------------------------- evaluation
def evaluate(model_file: Path, data_dir: Path, gal, summary: Optional[Path]) -> dict:
    model = core.load_model(model_file)
    res: dict = {"accuracy": core.val_accuracy(model, data_dir)}
    if gal is not None:
        res.update(core.gallery_metrics(model, gal, FARS))
    if summary is not None:
        res.update(core.history(summary))
    return res


def l0(r: dict, classes: int) -> float:
    """L0 of a run (all-orthogonal embeddings; docs/RESULTS.md), P from its last 10 % of kept pairs."""
    return core.orthogonal_loss(classes, 32.0, 0.3, core.kept_pairs(r.get("kept_fraction"), PAIRS) or 0.0)


# --------------------------------------------------------------------- runs
#: every finished run's metrics and the source model, committed: a later session (a fresh
#: work tree) continues the study where it stopped instead of running it again
DOC = core.ROOT / "docs" / "results" / "finetune"


def _restore(out: Path, name: str) -> None:
    """Copy a committed run's metrics (and the source model) into ``out/runs`` if missing there."""
    run = out / "runs" / name
    src = DOC / "runs" / f"{name}.json"
    if not (run / "metrics.json").is_file() and src.is_file():
        run.mkdir(parents=True, exist_ok=True)
        (run / "metrics.json").write_text(src.read_text())
    if name == "source" and not (run / "model.pt").is_file() and (DOC / "source_model.pt").is_file():
        shutil.copyfile(DOC / "source_model.pt", run / "model.pt")


def _keep(out: Path, name: str) -> None:
    """Commit-side copy of a finished run's metrics (and the source model)."""
    run = out / "runs" / name
    (DOC / "runs").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / "metrics.json", DOC / "runs" / f"{name}.json")
    if name == "source":
        shutil.copyfile(run / "model.pt", DOC / "source_model.pt")


def run_source(out: Path) -> Path:
    run = out / "runs" / "source"
    _restore(out, "source")
    if not ((run / "metrics.json").is_file() and (run / "model.pt").is_file()):
        d = source_data(out)
        t0 = time.time()
        core.train(run, d, 0, SOURCE_LOSS, config=CONFIG, extra=[f"run.max_steps={SOURCE_STEPS}", *SCRATCH])
        m = evaluate(run / "model.pt", d, None, run / "summary.json")
        m.update(seconds=time.time() - t0, l0=core.orthogonal_loss(SOURCE["identities"], 32.0, 0.3))
        (run / "metrics.json").write_text(json.dumps(m))
        print(f"source: loss {m['start']:.2f} -> {m['end']:.2f} (L0 {m['l0']:.2f}), domain-A val acc "
              f"{m['accuracy']:.4f} ({m['seconds']:.0f} s)", flush=True)
        _keep(out, "source")
    return run / "model.pt"


def slug(images: int, arm: str, seed: int) -> str:
    return f"img{images}__{arm.replace('+', '_').replace(' ', '_')}__seed{seed}"


def run_arm(out: Path, images: int, arm: str, seed: int, extra: Sequence[str], loss: dict, gal) -> dict:
    run = out / "runs" / slug(images, arm, seed)
    _restore(out, slug(images, arm, seed))
    if (run / "metrics.json").is_file():
        return json.loads((run / "metrics.json").read_text())
    source = run_source(out)
    d = target_data(out, images)
    t0 = time.time()
    core.train(run, d, seed, dict(margin="arcface", s=32.0, m=0.3, **loss), config=CONFIG,
          extra=[f"run.max_steps={STEPS}", *(e.format(source=source) for e in extra)])
    m = evaluate(run / "model.pt", d, gal, run / "summary.json")
    m.update(images=images, arm=arm, seed=seed, seconds=time.time() - t0)
    m["end_l0"] = m["end"] / l0(m, TARGET_IDS)
    (run / "metrics.json").write_text(json.dumps(m))
    _keep(out, slug(images, arm, seed))
    print(f"img {images} {arm} seed {seed}: loss {m['start']:.2f} -> {m['end']:.2f} (end/L0 {m['end_l0']:.2f}) "
          f"TAR@1e-4 {m['tar_at_far']['0.0001']:.4f} within-family {m['tar_at_far_within_family']['0.0001']:.4f} "
          f"acc {m['accuracy']:.4f} ({m['seconds']:.0f} s)", flush=True)
    return m


def best_ft_arm(out: Path) -> str:
    """The bn rule: the fine-tune arm with the best mean TAR@1e-4 at 8 images (all finished seeds)."""
    scores = {}
    for arm in ARMS:
        if not arm.startswith("ft"):
            continue
        cell = slug(8, arm, 0).rsplit("__seed", 1)[0]
        rs = [json.loads(p.read_text()) for p in (out / "runs").glob(f"{cell}__seed*/metrics.json")]
        if rs:
            scores[arm] = float(np.mean([r["tar_at_far"]["0.0001"] for r in rs]))
    if not scores:
        raise SystemExit("--part bn needs the main fine-tune arms at 8 images first")
    return max(scores, key=lambda arm: scores[arm])


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=core.ROOT / "bench_out" / "finetune")
    p.add_argument("--grid", type=Path, help="only write the domain A / B picture grid here")
    p.add_argument("--part", choices=["source", "main", "bn"], default="main")
    p.add_argument("--images", type=int, nargs="*", default=list(IMAGES), choices=IMAGES)
    p.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS))
    p.add_argument("--arms", nargs="*", choices=list(ARMS))
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args(argv)
    if a.grid:
        print(f"wrote {domain_grid(a.grid)}")
        return 0
    torch.set_num_threads(2)
    a.out.mkdir(parents=True, exist_ok=True)
    if not a.report_only:
        t_all = time.time()
        source = run_source(a.out)
        if a.part != "source":
            gal = gallery(a.out)
            zs = a.out / "runs" / "zero_shot" / "metrics.json"
            _restore(a.out, "zero_shot")
            if not zs.is_file():
                zs.parent.mkdir(parents=True, exist_ok=True)
                m = evaluate(source, target_data(a.out, 8), gal, None)
                zs.write_text(json.dumps(m))
                _keep(a.out, "zero_shot")
            for images in a.images:
                for seed in a.seeds:
                    if a.part == "main":
                        for arm in a.arms or list(ARMS):
                            _, extra, loss = ARMS[arm]
                            run_arm(a.out, images, arm, seed, extra, loss, gal)
                    else:
                        best = best_ft_arm(a.out)
                        _, extra, loss = ARMS[best]
                        for mode in BN_MODES:
                            run_arm(a.out, images, f"{best} bn-{mode}", seed, [*extra, f"model.bn_mode={mode}"],
                                    loss, gal)
        print(f"wall time of this invocation: {time.time() - t_all:.0f} s", flush=True)
    print(report(a.out))
    return 0


def report(out: Path) -> str:
    """Table (mean ± std over seeds), gains paired by seed, and the plots (docs/results);
    the committed runs count too (a fresh work tree reports the whole study)."""
    for src in sorted((DOC / "runs").glob("img*.json")):
        _restore(out, src.stem)
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("img*/metrics.json"))]
    if not runs:
        return "no finished runs"
    lines = ["| images/id | arm | seeds | loss start -> end | end / L0 | TAR@1e-3 | TAR@1e-4 | "
             "within-family TAR@1e-4 | val acc |", "| " + " | ".join(["---"] * 9) + " |"]
    zs_file = out / "runs" / "zero_shot" / "metrics.json"
    if zs_file.is_file():
        z = json.loads(zs_file.read_text())
        lines.append(f"| any | source model, zero-shot | - | - | - | {100 * z['tar_at_far']['0.001']:.2f} | "
                     f"{100 * z['tar_at_far']['0.0001']:.2f} | {100 * z['tar_at_far_within_family']['0.0001']:.2f} | "
                     f"{100 * z['accuracy']:.2f} |")

    def ms(vals):
        return f"{100 * np.mean(vals):.2f} ± {100 * core.sd(vals):.2f}"

    cells: Dict[tuple, List[dict]] = {}
    for r in runs:
        cells.setdefault((r["images"], r["arm"]), []).append(r)
    for (images, arm), rs in sorted(cells.items()):
        stalled = sum(r["end_l0"] > STALL for r in rs)
        lines.append(f"| {images} | {arm}{' **does not train**' if stalled else ''} | {len(rs)} | "
                     f"{np.mean([r['start'] for r in rs]):.2f} -> {np.mean([r['end'] for r in rs]):.2f} | "
                     f"{np.mean([r['end_l0'] for r in rs]):.2f} | {ms([r['tar_at_far']['0.001'] for r in rs])} | "
                     f"{ms([r['tar_at_far']['0.0001'] for r in rs])} | "
                     f"{ms([r['tar_at_far_within_family']['0.0001'] for r in rs])} | "
                     f"{ms([r['accuracy'] for r in rs])} |")
    pairs = [("ft random", "scratch"), ("ft imprint", "ft random"), ("ft random+unpg1.0", "ft random"),
             ("ft imprint+unpg1.0", "ft imprint"), ("ft imprint+unpg1.5", "ft imprint"), ("scratch+unpg1.0", "scratch")]
    # the BatchNorm arms against their own arm in bn_mode train (whichever arm the rule picked)
    pairs += sorted({(arm, arm.rsplit(" bn-", 1)[0]) for (_, arm) in cells if " bn-" in arm})
    gains = ["| images/id | arm | vs | seeds | gain TAR@1e-4 | wins | gain within-family TAR@1e-4 | gain val acc |",
             "| " + " | ".join(["---"] * 8) + " |"]
    for images in IMAGES:
        for arm, base in pairs:
            x = {r["seed"]: r for r in cells.get((images, arm), [])}
            y = {r["seed"]: r for r in cells.get((images, base), [])}
            seeds = sorted(set(x) & set(y))
            if not seeds:
                continue
            g = [x[s]["tar_at_far"]["0.0001"] - y[s]["tar_at_far"]["0.0001"] for s in seeds]
            gw = [x[s]["tar_at_far_within_family"]["0.0001"] - y[s]["tar_at_far_within_family"]["0.0001"]
                  for s in seeds]
            ga = [x[s]["accuracy"] - y[s]["accuracy"] for s in seeds]
            gains.append(f"| {images} | {arm} | {base} | {len(seeds)} | {ms(g)} | {sum(v > 0 for v in g)}/{len(g)} | "
                         f"{ms(gw)} | {ms(ga)} |")
    budget = sum(r["seconds"] for r in runs) / 60
    text = ("\n".join(lines) + "\n\n" + "\n".join(gains)
            + f"\n\n{len(runs)} runs, {budget:.1f} min of training + evaluation")
    _plots(out, cells)
    return text


def _plots(out: Path, cells: Dict[tuple, List[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = core.ROOT / "docs" / "results"
    doc.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(IMAGES), figsize=(6 * len(IMAGES), 4), squeeze=False)
    for ax, images in zip(axes[0], IMAGES):
        arms = [a for (i, a) in sorted(cells) if i == images]
        for j, arm in enumerate(arms):
            for k, r in enumerate(cells[(images, arm)]):
                ax.plot(r["loss"], color=f"C{j % 10}", lw=0.6, alpha=0.8, label=arm if k == 0 else None)
        ax.axhline(core.orthogonal_loss(TARGET_IDS, 32.0, 0.3), color="k", ls=":", lw=1, label="L0 (plain)")
        ax.set(title=f"{images} images per identity", xlabel="step", ylabel="training loss")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(doc / "finetune_loss.png", dpi=80)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(IMAGES), figsize=(6 * len(IMAGES), 4), squeeze=False)
    for ax, images in zip(axes[0], IMAGES):
        arms = [a for (i, a) in sorted(cells) if i == images]
        vals = [[100 * r["tar_at_far"]["0.0001"] for r in cells[(images, a)]] for a in arms]
        ax.bar(range(len(arms)), [np.mean(v) for v in vals], yerr=[core.sd(v) for v in vals], capsize=3)
        ax.set_xticks(range(len(arms)), arms, rotation=60, ha="right", fontsize=7)
        ax.set(title=f"{images} images per identity", ylabel="TAR@FAR=1e-4 (%)")
    fig.tight_layout()
    fig.savefig(doc / "finetune_tar.png", dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
