"""The studies' shared core (bench/experiments/core.py) against definitions written out here,
and the documented command lines of the studies (bench/experiment.py, bench/finetune.py)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from bench.experiments import core


class _Flat(torch.nn.Module):
    """A fixed 'backbone': mean colour of 4 image quarters (12 features) plus a little noise-free mix."""

    def forward(self, x):
        q = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
        return torch.cat([q, q.roll(1, dims=1) * 0.5], dim=1)


def test_gallery_metrics_counts_and_pairs_from_the_definition():
    """All pairs i < j; genuine = same identity; within-family impostors = other identity, same
    family; TAR@FAR on all pairs and on genuine + within-family ones."""
    from eval.metrics import tar_at_far
    from trainer.verification_protocol import embed_images

    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    families = labels // 2                      # (0, 1), (2, 3), (4)
    images = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8, generator=g)
    images[labels == 1] = images[labels == 0].flip(0)  # look-alikes: close to identity 0
    model = _Flat()
    got = core.gallery_metrics(model, (images, labels, families), (0.1, 0.5))

    emb = torch.nn.functional.normalize(embed_images(model, images, progress=False).float(), dim=1).numpy()
    scores, same, within = [], [], []
    for i, j in itertools.combinations(range(10), 2):
        scores.append(float(emb[i] @ emb[j]))
        same.append(bool(labels[i] == labels[j]))
        within.append(bool(labels[i] != labels[j] and families[i] == families[j]))
    scores, same, within = np.array(scores), np.array(same), np.array(within)
    assert got["pairs"] == {"genuine": 5, "impostor": 40, "within_family": 8}
    keep = same | within
    want_all = tar_at_far(scores, same, (0.1, 0.5))
    want_within = tar_at_far(scores[keep], same[keep], (0.1, 0.5))
    for far in (0.1, 0.5):
        assert got["tar_at_far"][str(far)] == pytest.approx(want_all[far], abs=1e-6)
        assert got["tar_at_far_within_family"][str(far)] == pytest.approx(want_within[far], abs=1e-6)
    # no look-alikes (every identity its own family): no within-family entry
    alone = core.gallery_metrics(model, (images, labels, labels), (0.1,))
    assert "tar_at_far_within_family" not in alone and alone["pairs"]["within_family"] == 0


def test_kept_pairs_and_orthogonal_loss_of_a_unpg_run():
    """L0's P is the mean kept pairs of the last 10 % of steps (UNPG statistics missing: None)."""
    kept = [None] * 5 + [0.5] * 90 + [0.25] * 10
    assert core.kept_pairs(kept, 1000) == pytest.approx(250.0)
    assert core.kept_pairs([None, None], 1000) is None and core.kept_pairs(None, 10) is None


def test_grids_are_the_pictures_side_by_side(tmp_path):
    from PIL import Image

    from bench.experiments.finetune import domain_grid
    from bench.experiments.ratio import family_grid
    from data_tools.synth import SIZE, make_pixels

    p = family_grid(tmp_path / "f.png", members=2, images=3, identity=100_001)
    arr = np.asarray(Image.open(p))
    assert arr.shape == (2 * SIZE, 3 * SIZE, 3)
    first = 100_000  # the family of identity 100_001 (families of 4)
    want = make_pixels(0, first + 1, 10_002, family_size=4, family_spread=0.25)
    assert np.array_equal(arr[SIZE:, 2 * SIZE:], want)
    d = np.asarray(Image.open(domain_grid(tmp_path / "d.png", identities=2, images=2)))
    assert d.shape == (2 * SIZE, 4 * SIZE + 8, 3) and (d[:, 2 * SIZE : 2 * SIZE + 8] == 255).all()
    assert np.array_equal(d[:SIZE, 2 * SIZE + 8 : 3 * SIZE + 8], make_pixels(0, 0, 0, domain="B"))


def test_the_documented_command_lines_reach_their_study(monkeypatch, tmp_path):
    """``python -m bench.experiment`` (both studies) and ``python -m bench.finetune`` parse as before
    and hand the options to the right study module."""
    import bench.experiment as cli
    from bench import finetune
    from bench.experiments import finetune as ft
    from bench.experiments import noise, ratio

    seen = {}
    monkeypatch.setattr(noise, "run", lambda a: seen.setdefault("noise", a))
    monkeypatch.setattr(ratio, "run", lambda a: seen.setdefault("ratio", a))
    cli.main(["--group", "core", "--noise", "0.2", "--seeds", "0", "--out", str(tmp_path / "n")])
    cli.main(["--group", "ratio", "--ids", "300", "--families", "on", "--seeds", "0", "--baseline", "paper"])
    assert seen["noise"].group == "core" and seen["noise"].noise == [0.2]
    assert seen["ratio"].ids == [300] and seen["ratio"].out.name == "ratio"  # its own default folder
    assert finetune.main is ft.main
