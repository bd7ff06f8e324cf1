"""When does UNPG help? The pairs:classes sweep with look-alike families (issue #16,
docs/RESULTS.md "UNPG against the ratio of negative pairs to classes").

Sweep the ratio of negative pairs per step to classes at the paper's loss settings, with and
without look-alike families (``data_tools synth --family-size``). Fixed before any run; nothing
here is tuned on held-out pairs.

    python -m bench.experiment --group ratio --ids 300 --families on --seeds 0 --baseline paper
    python -m bench.experiment --group ratio --report-only
    python -m bench.experiment --family-grid docs/results/family_grid.png
(``python -m bench.experiments.ratio ...`` is the same without ``--group ratio``.) Finished runs are
skipped, so the sweep runs in parts.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from bench.experiments import core

FARS = (1e-3, 1e-4)

CONFIG = "configs/experiment_ratio.yaml"
GLOBAL_BATCH = 128  # 64 per rank x 2 ranks (configs/experiment_ratio.yaml), every arm
PAIRS = GLOBAL_BATCH * (GLOBAL_BATCH - 1) // 2  # 8,128 pairs per step
IDS = (300, 1500, 5000, 8000)  # 8000 optional (not in the default parts)
DEFAULT_IDS = (300, 1500, 5000)
IMAGES = 10  # training images per identity, every count
#: optimizer steps per identity count (equal for every arm of a count); the loss-flattening
#: criterion (core.FLAT) is checked and reported, not used to stop runs
STEPS = {300: 400, 1500: 500, 5000: 600, 8000: 700}
FAMILY: Dict[str, Any] = dict(family_size=4, family_spread=0.25)  # "families on"; off: family_size 1
VAL_IDS = 300  # held-out identities in val.bin (10-fold accuracy), after the training ones
VAL_PAIRS = 600
#: the held-out gallery (TAR@FAR): GALLERY_IDS identities from GALLERY_FIRST on (never
#: trained on at any count, whole families), GALLERY_IMAGES images each, all pairs
GALLERY_FIRST, GALLERY_IDS, GALLERY_IMAGES = 100_000, 300, 16
SEEDS = (0, 1, 2)  # training seeds; the data (seed 0) is fixed
#: name -> (baseline set, loss overrides). "paper": s = 64, ArcFace m = 0.5 (the paper's);
#: "working": the earlier study's smaller m = 0.3 at the same s = 64 (the working-baseline rule)
ARMS: Dict[str, tuple] = {
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
PLAIN = {"paper": "arcface", "working": "arcface m0.3", "recipe": "arcface s32 m0.3"}
#: (whether a run trains / has flattened: bench.experiments.core.TRAINS / FLAT, 0.9 and 2 %)
#: added after seed 0 (see docs/RESULTS.md): a run "ends near L0" when its final loss is above 0.9 x the
#: loss of all-orthogonal embeddings (run_orthogonal_loss); the 0.9 rule above counts such runs as training
STALL = 0.9


def family(families: bool) -> dict:
    return dict(FAMILY) if families else dict(family_size=1, family_spread=1.0)


def make_data(out: Path, ids: int, families: bool) -> Path:
    from data_tools.synth import generate_dataset

    d = out / "data" / f"ids{ids}_fam{'on' if families else 'off'}"
    if not (d / "val.bin").is_file():
        print(f"generating {d} ...", flush=True)
        f = family(families)
        generate_dataset(d, ids, IMAGES, seed=0, val_identities=VAL_IDS, val_pairs=VAL_PAIRS,
                         family_size=f["family_size"], family_spread=f["family_spread"], val_family_share=0.5)
    return d


def make_gallery(out: Path, families: bool) -> tuple:
    """(uint8 images NCHW, identity labels, family labels) of the held-out gallery."""
    return core.synth_gallery(out / "data" / f"gallery_fam{'on' if families else 'off'}.pt", 0, GALLERY_FIRST,
                         GALLERY_IDS, GALLERY_IMAGES, family(families))


def slug(ids: int, families: bool, arm: str, seed: int) -> str:
    return f"ids{ids}__fam{'on' if families else 'off'}__{arm.replace('+', '_').replace(' ', '_')}__seed{seed}"


def evaluate(run: Path, data_dir: Path, gallery) -> dict:
    """val.bin accuracy; TAR@FAR on all gallery pairs and on genuine + within-family impostors."""
    model = core.load_model(run / "model.pt")
    res = {"accuracy": core.val_accuracy(model, data_dir), **core.gallery_metrics(model, gallery, FARS)}
    res.update(core.history(run / "summary.json"))
    return res


def run_orthogonal_loss(r: dict) -> float:
    """L0 of a sweep run, P = its mean kept pairs over the last 10 % of steps (0 without UNPG).

    A run whose loss ends near L0 has learned little beyond pushing everything apart; a
    loss-only check, independent of held-out pairs.
    """
    loss = ARMS[r["arm"]][1]
    pairs = 0.0
    if loss["unpg"]:
        kept = core.kept_pairs(r.get("kept_fraction"), PAIRS)
        pairs = float(PAIRS) if kept is None else kept
    return core.orthogonal_loss(r["ids"], loss["s"], loss["m"], pairs)


def report(out: Path, results: Dict[tuple, dict], doc_dir: Path) -> str:
    """Aggregate table (mean ± std over seeds), the gain plot and the loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def ms(vals, scale=100.0):
        vals = [v for v in vals if v is not None]
        return f"{scale * np.mean(vals):.2f} ± {scale * core.sd(vals):.2f}" if vals else "-"

    cells: Dict[tuple, List[dict]] = {}
    for (ids, fam, arm, _seed), r in sorted(results.items()):
        cells.setdefault((ids, fam, arm), []).append(r)
    lines = ["| ids | pairs:classes | families | arm | runs | steps | loss start -> end | end / L0 | trains / flat | "
             "TAR@1e-3 | TAR@1e-4 | within-family TAR@1e-3 | within-family TAR@1e-4 | val.bin acc |",
             "| " + " | ".join(["---"] * 14) + " |"]
    for ids in IDS:
        for fam in (False, True):
            for arm in ARMS:
                rs = cells.get((ids, fam, arm))
                if not rs:
                    continue
                trains = sum(r["trains"] for r in rs)
                flat = sum(r["flat"] for r in rs)
                end_l0 = [r["end"] / run_orthogonal_loss(r) for r in rs]
                stalls = sum(v > STALL for v in end_l0)
                flag = (f"{trains}/{len(rs)} / {flat}/{len(rs)}" + (" **DOES NOT TRAIN**" if trains < len(rs) else "")
                        + (f" **ends near L0 ({stalls}/{len(rs)})**" if stalls else ""))
                wf = [r.get("tar_at_far_within_family") for r in rs]
                lines.append(
                    f"| {ids} | {PAIRS / ids:.1f}:1 | {'on' if fam else 'off'} | {arm} | {len(rs)} | "
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
    for ids in IDS:
        for fam in (False, True):
            for arm, (bset, loss) in ARMS.items():
                if not loss["unpg"]:
                    continue
                plain = PLAIN[bset]
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
                gain_lines.append(f"| {ids} | {PAIRS / ids:.1f}:1 | {'on' if fam else 'off'} | {arm} | {plain} | "
                                  f"{len(seeds)} | {ms(g3)} | {ms(g)} | {sum(v > 0 for v in g)}/{len(g)} | "
                                  f"{ms(gw3) if gw else '-'} | {ms(gw) if gw else '-'} | {ms(ga)} |")
                series.setdefault((fam, arm), []).append((PAIRS / ids, 100 * np.mean(g), 100 * core.sd(g)))
    # the budget actually spent per part (training + evaluation of every finished run)
    budget = [
        "| ids | families | runs | steps per run | train s per run (mean) | total min |",
        "| " + " | ".join(["---"] * 6) + " |",
    ]
    for ids in IDS:
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
    sets = [b for b in PLAIN if any(ARMS[a][0] == b for (_, a) in series)]
    fig, axes = plt.subplots(1, max(1, len(sets)), figsize=(7.0 * max(1, len(sets)), 4.6), squeeze=False)
    for ax, bset in zip(axes[0], sets):
        for (fam, arm), pts in sorted(series.items()):
            if ARMS[arm][0] != bset:
                continue
            wisk = ARMS[arm][1]["wisk"]
            x, y, e = (np.asarray(v) for v in zip(*sorted(pts)))
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, color="C0" if wisk == 1.0 else "C1",
                        label=f"wisk {wisk}, families {'on' if fam else 'off'}", linestyle="-" if fam else "--")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlim(0.8, 40)
        m = ARMS[PLAIN[bset]][1]["m"]
        ax.set(xlabel="negative pairs per step : classes", ylabel="UNPG gain in TAR@FAR=1e-4 (points, ± std)",
               title=f"ArcFace s={ARMS[PLAIN[bset]][1]['s']:g} m={m} ({bset}): UNPG minus plain, by seed")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    doc_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(doc_dir / "ratio_gain.png", dpi=90)
    plt.close(fig)
    # every arm's loss curve (every seed): one panel per (ids, families), rows = families off / on;
    # dotted: L0 of each plain arm (all-orthogonal embeddings, run_orthogonal_loss)
    ids_done = sorted({i for (i, _, _, _) in results})
    fams_done = sorted({f for (_, f, _, _) in results})
    if results:
        fig, axes = plt.subplots(len(fams_done), len(ids_done), figsize=(4.6 * len(ids_done), 3.4 * len(fams_done)),
                                 squeeze=False)
        for row, fam in enumerate(fams_done):
            for col, ids in enumerate(ids_done):
                ax = axes[row][col]
                for j, arm in enumerate(ARMS):
                    runs = [r for (i, f, a, _), r in sorted(results.items()) if (i, f, a) == (ids, fam, arm)]
                    for k, r in enumerate(runs):
                        ax.plot(r["loss"], color=f"C{j}", lw=0.6, alpha=0.7, label=arm if k == 0 else None)
                    if runs and not ARMS[arm][1]["unpg"]:
                        ax.axhline(run_orthogonal_loss(runs[0]), color=f"C{j}", ls=":", lw=1.2,
                                   label=f"L0 of {arm}")
                ax.set(title=f"{ids} ids ({PAIRS / ids:.1f}:1), families {'on' if fam else 'off'}",
                       xlabel="step", ylabel="training loss")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(doc_dir / "ratio_loss.png", dpi=72)
        plt.close(fig)
    return table


def family_grid(path: Path, members: int = 4, images: int = 5, identity: int = GALLERY_FIRST) -> Path:
    """A PNG grid of one family: ``members`` rows (identities) x ``images`` columns."""
    from data_tools.synth import make_pixels

    first = identity - identity % FAMILY["family_size"]
    return core.save_grid(path, [[make_pixels(0, first + r, 10_000 + c, **FAMILY) for c in range(images)]
                            for r in range(members)])


def run(args: argparse.Namespace) -> None:
    """The sweep's runs of ``args`` (finished ones skipped); then the table and the plots."""
    from trainer.io.atomic import atomic_open

    ids_list = args.ids or list(DEFAULT_IDS)
    fams = [f == "on" for f in (args.families or ["off", "on"])]
    baseline = args.baseline or ["auto"]
    seeds = args.seeds

    def plan(sets):
        arms = args.arms or [a for a, (b, _) in ARMS.items() if b in sets]
        return [(i, f, a, s) for i in ids_list for f in fams for s in seeds for a in arms]

    def working_needed(ids, fam):
        """The working-baseline rule: a cell gets the m = 0.3 arms when a paper plain run did not train."""
        cell = slug(ids, fam, PLAIN["paper"], 0).rsplit("__seed", 1)[0]
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
            if "auto" in baseline and ARMS[arm][0] == "working" and not working_needed(ids, fam):
                continue
            run_dir = args.out / "runs" / slug(ids, fam, arm, seed)
            if (run_dir / "metrics.json").is_file():
                continue
            data_dir = make_data(args.out, ids, fam)
            gallery = make_gallery(args.out, fam)
            steps = args.max_steps or STEPS[ids]
            t0 = time.time()
            core.train(run_dir, data_dir, seed, ARMS[arm][1], config=CONFIG, extra=[f"run.max_steps={steps}"])
            t_train = time.time() - t0
            m = evaluate(run_dir, data_dir, gallery)
            m.update(ids=ids, families=fam, arm=arm, seed=seed, steps=steps, train_seconds=t_train,
                     seconds=time.time() - t0)
            with atomic_open(run_dir / "metrics.json", "w") as fh:
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
    print(report(args.out, results, args.doc_dir))
    print(f"\nplots: {args.doc_dir}/ratio_gain.png, {args.doc_dir}/ratio_loss.png; table: {args.out}/ratio_results.md")


def add_args(ap: argparse._ActionsContainer) -> None:
    """The sweep's options (bench/experiment.py puts them in its ``--group ratio`` group)."""
    ap.add_argument("--ids", type=int, nargs="*", choices=IDS,
                    help=f"training identity counts (default {list(DEFAULT_IDS)})")
    ap.add_argument("--families", nargs="*", choices=["off", "on"], help="default: both")
    ap.add_argument(
        "--baseline",
        nargs="*",
        choices=["auto", *PLAIN],
        help="arm sets: paper (s=64 m=0.5), working (s=64 m=0.3), recipe (s=32 m=0.3), or auto (default): "
        "paper, plus working for the (ids, families) cells where a paper plain ArcFace run did not train",
    )
    ap.add_argument("--max-steps", type=int, help="override the steps per count (pilots only: use another --out)")
    ap.add_argument("--doc-dir", type=Path, default=core.ROOT / "docs" / "results",
                    help="where the ratio plots go (default docs/results)")
    ap.add_argument("--family-grid", type=Path, help="only write the PNG grid of one family (4 x 5) here")


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.experiments.ratio", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=core.ROOT / "bench_out" / "ratio")
    ap.add_argument("--arms", nargs="*", help=f"subset of: {list(ARMS)}")
    ap.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS))
    ap.add_argument("--report-only", action="store_true")
    add_args(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    if args.family_grid:
        print(f"wrote {family_grid(args.family_grid)}")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    run(args)


if __name__ == "__main__":
    main()
