"""data_tools synth --family-size/--family-spread: look-alike families and the val_pairs.json sidecar."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from data_tools.synth import family_of, generate_dataset, identity_params, param_vector
from trainer.io.binfile import read_bin


def sha(p):
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


# sha256 of the output of the synth code before families existed (commit 2c2c71e), for
# generate_dataset(d, 6, 3, seed=3, label_noise=0.2, val_identities=4, val_pairs=8, workers=1)
# with simplejpeg 1.x / libjpeg-turbo as pinned in requirements.txt.
PRE_FAMILY_SHA = {
    "train.rec": "1955372970ca65046c434d6644c8e5f28a75413b7cf50cfce7202e46bafe4aed",
    "train.idx": "30a0eeb18369b223cfdb01bcca6f51469c04aa6e18bc80ff4d0abf834fa4f8e4",
    "val.bin": "441a8207274a80c0ce4414250b3d717c89d57b8768afbf15765ccaa07f0d8987",
}


@pytest.mark.parametrize("extra", [{}, {"family_size": 1, "family_spread": 0.7, "val_family_share": 0.9}])
def test_family_size_one_writes_the_same_bytes_as_before(tmp_path, extra):
    generate_dataset(tmp_path, 6, 3, seed=3, label_noise=0.2, val_identities=4, val_pairs=8, workers=1, **extra)
    assert {f: sha(tmp_path / f) for f in PRE_FAMILY_SHA} == PRE_FAMILY_SHA
    assert not (tmp_path / "val_pairs.json").exists()


def test_family_members_are_closer_in_parameter_space():
    K, n = 4, 40
    for spread in (0.25, 0.5):
        v = np.stack([param_vector(identity_params(0, i, K, spread)) for i in range(n)])
        v = (v - v.mean(0)) / (v.std(0) + 1e-9)
        d = np.sqrt(((v[:, None] - v[None]) ** 2).sum(-1))
        fam = family_of(np.arange(n), K)
        same = fam[:, None] == fam[None]
        off = ~np.eye(n, dtype=bool)
        within, across = d[same & off].mean(), d[~same].mean()
        # member = (1-x) b + x o with b, o independent draws: within-family differences have
        # std x*sqrt(2)*sigma, across-family ones sqrt(2*((1-x)^2 + x^2))*sigma
        expect = spread / np.sqrt((1 - spread) ** 2 + spread ** 2)
        assert within < across and abs(within / across - expect) < 0.12, (spread, within, across, expect)
    # spread 1: as unrelated as independent identities; spread 0: one face per family
    v1 = [param_vector(identity_params(0, i, K, 1.0)) for i in range(4)]
    v0 = [param_vector(identity_params(0, i, K, 0.0)) for i in range(4)]
    assert np.allclose(v1[2], param_vector(identity_params(0, 2)), atol=1e-6)
    assert all(np.allclose(v0[0], x) for x in v0) and not np.allclose(v1[0], v1[1])


def test_sidecar_marks_exactly_the_within_family_impostors(tmp_path):
    K = 4
    s = generate_dataset(tmp_path, 8, 2, seed=5, val_identities=16, val_pairs=40, workers=1,
                         family_size=K, family_spread=0.3, val_family_share=0.5)
    side = json.loads((tmp_path / "val_pairs.json").read_text())
    imgs, same = read_bin(tmp_path / "val.bin")
    pairs = side["pairs"]
    assert len(pairs) == len(same) == 40 and [p[2] for p in pairs] == list(same)
    for a, b, genuine, within in pairs:
        assert 8 <= a < 24 and 8 <= b < 24  # held-out identities only
        assert genuine == (a == b)
        assert within == (not genuine and a // K == b // K)
    assert sum(p[3] for p in pairs) == s["val_within_family_impostor"] == 10  # round(0.5 * 20)
    # the pair images are those identities' images: a genuine pair's images differ from an impostor's family
    gen = generate_dataset(tmp_path / "again", 8, 2, seed=5, val_identities=16, val_pairs=40, workers=2,
                           family_size=K, family_spread=0.3, val_family_share=0.5)
    assert gen["val_within_family_impostor"] == 10
    for f in ("train.rec", "val.bin", "val_pairs.json"):
        assert sha(tmp_path / f) == sha(tmp_path / "again" / f), f  # deterministic, any worker count


def test_families_change_the_data_and_reject_split_families(tmp_path):
    generate_dataset(tmp_path / "a", 8, 2, seed=5, workers=1)
    generate_dataset(tmp_path / "b", 8, 2, seed=5, workers=1, family_size=4)
    assert sha(tmp_path / "a" / "train.rec") != sha(tmp_path / "b" / "train.rec")
    with pytest.raises(ValueError, match="multiples"):
        generate_dataset(tmp_path / "c", 6, 2, seed=5, workers=1, family_size=4)
    with pytest.raises(ValueError, match="family_spread"):
        generate_dataset(tmp_path / "d", 8, 2, seed=5, workers=1, family_size=4, family_spread=1.5)


def test_ratio_sweep_flags_an_arm_that_does_not_train():
    from bench.experiments.core import loss_stats as ratio_loss_stats

    steps = np.arange(300)
    trains = ratio_loss_stats(list(40 * np.exp(-steps / 40) + 10))
    stalls = ratio_loss_stats(list(49 - 0.01 * steps + 0.3 * np.sin(steps)))
    still_falling = ratio_loss_stats(list(49 - 0.1 * steps))
    assert trains["trains"] and trains["flat"]
    assert not stalls["trains"] and stalls["start"] > 48
    assert still_falling["trains"] and not still_falling["flat"]


def test_ratio_report_pairs_the_gain_by_seed(tmp_path):
    """The gain is UNPG minus plain of the same seed (mean ± sample std), not a difference of means."""
    from bench.experiments.ratio import report as ratio_report

    def run(ids, arm, seed, tar4, within4):
        return {
            "ids": ids,
            "families": True,
            "arm": arm,
            "seed": seed,
            "steps": 3,
            "loss": [3.0, 2.0, 1.0],
            "start": 3.0,
            "end": 1.0,
            "trains": True,
            "flat": False,
            "accuracy": 0.9,
            "tar_at_far": {"0.001": 0.5, "0.0001": tar4},
            "tar_at_far_within_family": {"0.001": 0.4, "0.0001": within4},
            "train_seconds": 10.0,
            "seconds": 12.0,
        }

    plain = {0: 0.10, 1: 0.30, 2: 0.20}
    gain = {0: 0.05, 1: -0.01, 2: 0.02}   # paired gains; differences of unpaired means would hide the sign flip
    results = {}
    for s in plain:
        results[(300, True, "arcface", s)] = run(300, "arcface", s, plain[s], 0.2)
        results[(300, True, "arcface+unpg wisk1.5", s)] = run(300, "arcface+unpg wisk1.5", s, plain[s] + gain[s], 0.1)
    table = ratio_report(tmp_path, results, tmp_path / "doc")
    row = next(line for line in table.splitlines() if "| arcface+unpg wisk1.5 | arcface |" in line)
    cols = [c.strip() for c in row.strip("|").split("|")]
    g = np.array(list(gain.values()))
    assert cols[7] == f"{100 * g.mean():.2f} ± {100 * g.std(ddof=1):.2f}"   # gain TAR@1e-4 (all)
    assert cols[8] == "2/3"                                                  # UNPG better in 2 seeds of 3
    assert cols[10] == "-10.00 ± 0.00"                                        # within-family gain
    assert (tmp_path / "doc" / "ratio_gain.png").is_file() and (tmp_path / "ratio_results.md").is_file()
    assert "| all | | 6 | | | 1.2 |" in table                                # budget: 6 runs x 12 s
    rows = [json.loads(line) for line in (tmp_path / "doc" / "ratio_runs.jsonl").read_text().splitlines()]
    assert sorted((r["arm"], r["seed"]) for r in rows) == sorted((k[2], k[3]) for k in results)


@pytest.mark.parametrize("wisk", [None, 1.5])
def test_orthogonal_loss_is_the_loss_of_orthogonal_embeddings(wisk):
    """L0 (the 'ends near L0' check of the sweep) against the loss's definition (tests/heads/reference.py)."""
    import torch

    from bench.experiments.core import orthogonal_loss
    from tests.heads.reference import reference_loss

    classes, n, s, m = 7, 5, 64.0, 0.5
    eye = torch.eye(classes + n, dtype=torch.float64)
    w, x = eye[:classes], eye[classes:]          # centres and embeddings: every cosine 0
    labels = torch.tensor([0, 2, 3, 5, 6])        # distinct: all n(n-1)/2 pairs are negatives, all kept
    ref = reference_loss(x, labels, w, "arcface", {"m": m}, s, wisk=wisk)
    pairs = 0 if wisk is None else n * (n - 1) // 2
    assert orthogonal_loss(classes, s, m, pairs) == pytest.approx(float(ref), rel=1e-12)
