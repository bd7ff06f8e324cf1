"""The fine-tuning study (issue 22): pieces that exist so far.

``python -m bench.finetune --grid docs/results/finetune_domains.png`` draws the same
identities in synthetic domain A (the source model's) and domain B (the "custom
dataset": ``data_tools synth --domain B``), one row per identity, A's images on the left.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def domain_grid(out: Path, seed: int = 0, identities: int = 6, images: int = 4) -> Path:
    from PIL import Image

    from data_tools.synth import make_pixels

    rows = []
    for t in range(identities):
        a = [make_pixels(seed, t, i, domain="A") for i in range(images)]
        b = [make_pixels(seed, t, i, domain="B") for i in range(images)]
        gap = np.full_like(a[0][:, :8], 255)
        rows.append(np.concatenate(a + [gap] + b, axis=1))
    grid = np.concatenate(rows, axis=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(out)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", type=Path, required=True, help="PNG to write")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(f"wrote {domain_grid(a.grid, a.seed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
