"""``python -m bench.experiment``: the documented command line of two studies (docs/RESULTS.md).

    python -m bench.experiment                       # the UNPG study, whole grid (bench/experiments/noise.py)
    python -m bench.experiment --group core --noise 0.2 --seeds 0
    python -m bench.experiment --report-only
    python -m bench.experiment --group ratio --ids 300 --families on --seeds 0 --baseline paper
                                                     # the pairs:classes sweep (bench/experiments/ratio.py)
    python -m bench.experiment --family-grid docs/results/family_grid.png

The studies live in bench/experiments/ (one module each, on bench/experiments/core.py); this
module only parses the options both accept, as it always did, and hands them to the study.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch

from bench.experiments import noise, ratio


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.experiment", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", choices=[*noise.GROUPS, "ratio"], default="all",
                    help="ratio: the pairs:classes sweep (its own grid and output folder; not in 'all')")
    noise.add_args(ap)
    ratio.add_args(ap.add_argument_group("--group ratio"))
    return ap


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    if args.family_grid:
        print(f"wrote {ratio.family_grid(args.family_grid)}")
        return
    if args.group == "ratio":
        if args.out == ap.get_default("out"):
            args.out = ratio.core.ROOT / "bench_out" / "ratio"
        args.out.mkdir(parents=True, exist_ok=True)
        ratio.run(args)
        return
    noise.run(args)


if __name__ == "__main__":
    main()
