"""IJB 1:N read-outs (issue 27): the default reproduces insightface's ``ijb_evals.py``
(``evaluation_1N`` and the G1/G2 mean of ``run_model_test_1N``), ``readout="strict"``
keeps FPIR <= target and equal-weight means. Each rule is re-stated here from its
definition, not with eval/ijb_1n.py's helpers:

- insightface, per gallery: the script's loop (argsort per probe, top-k membership,
  ``pos > max(neg)``, the non-mated probes' best scores sorted descending and the
  threshold ``nm[max(int(n * far) - 1, 0)]``); mean rank-k = summed hits / all mated probes.
- strict, per gallery: every candidate threshold tried, the best TPIR whose FPIR <= f
  (tests/eval/test_ijb_protocol.py::_brute_force_1n); mean rank-k = mean of the rates.
Mean TPIR is the plain mean of the galleries' TPIRs in both.
"""
import json

import numpy as np
import pytest
import torch

from eval import ijb, ijb_1n
from tests.eval.fixtures import tiny_net
from tests.eval.ijb_release import make_release
from tests.eval.test_ijb_protocol import _brute_force_1n, _independent_scores

FPIRS = (1e-2, 1e-1)
RANKS = (1, 5, 10)


def _subject_level(sim, gal_subj):
    """One column per gallery subject: its best template score (the script's gallery holds one
    template per subject; this makes ours comparable with it)."""
    subjects = sorted(set(int(s) for s in gal_subj))
    cols = [np.max(sim[:, [j for j in range(sim.shape[1]) if gal_subj[j] == s]], axis=1) for s in subjects]
    return np.stack(cols, axis=1), np.array(subjects)


def _insightface_1n(sim, probe_subj, gal_subj, fars):
    """insightface's evaluation_1N, re-stated: (hit counts {k}, mated count, recalls {far},
    thresholds {far}, FPIR reached {far})."""
    sim, reg_ids = _subject_level(sim, gal_subj)
    hits = {1: 0, 5: 0, 10: 0}
    pos_sims, neg_max, non_gallery = [], [], []
    for i, q in enumerate(probe_subj):
        if q in reg_ids:
            label = int(np.argwhere(reg_ids == q)[0, 0])
            order = np.argsort(sim[i])[::-1]
            for k in hits:
                hits[k] += int(label in order[:k])
            pos_sims.append(sim[i][reg_ids == q][0])
            neg_max.append(sim[i][reg_ids != q].max())
        else:
            non_gallery.append(sim[i].max())
    pos_sims, neg_max = np.array(pos_sims), np.array(neg_max)
    nm = np.sort(np.array(non_gallery))[::-1]
    recalls, thresholds, reached = {}, {}, {}
    for far in fars:
        thr = nm[max(int(nm.shape[0] * far) - 1, 0)]
        recalls[far] = np.logical_and(pos_sims > neg_max, pos_sims > thr).sum() / pos_sims.shape[0]
        thresholds[far] = thr
        reached[far] = np.sum(nm > thr) / nm.shape[0]
    return hits, len(pos_sims), recalls, thresholds, reached


def _strict_threshold(sim, probe_subj, gal_subj, far):
    """The lowest threshold among the non-mated best scores (and -inf) whose FPIR <= far."""
    sim, reg_ids = _subject_level(sim, gal_subj)
    nm = [sim[i].max() for i, q in enumerate(probe_subj) if q not in reg_ids]
    ok = [t for t in [-np.inf] + nm if sum(v > t for v in nm) / len(nm) <= far]
    return min(ok), sum(v > min(ok) for v in nm) / len(nm)


def _random_case(seed, n_gal=30, n_probe=500, mated_share=0.5):
    rng = np.random.default_rng(seed)
    g_subj = np.arange(n_gal)
    p_subj = np.where(rng.random(n_probe) < mated_share, rng.integers(0, n_gal, n_probe),
                      rng.integers(n_gal, 10 * n_gal, n_probe))
    gf = rng.normal(size=(n_gal, 8))
    pf = rng.normal(size=(n_probe, 8))
    m = p_subj < n_gal
    pf[m] += 1.2 * gf[p_subj[m]]
    gf /= np.linalg.norm(gf, axis=1, keepdims=True)
    pf /= np.linalg.norm(pf, axis=1, keepdims=True)
    return pf, p_subj, gf, g_subj


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_threshold_rules_per_gallery(seed):
    """n f >= 2 at both FPIRs (about 250 non-mated probes: n f = 2.5 and 25): the default is
    insightface's nm[max(int(n f) - 1, 0)], strict the best TPIR with FPIR <= f; they differ."""
    pf, ps, gf, gs = _random_case(seed)
    sim = pf @ gf.T
    default = ijb_1n.identify(pf, ps, gf, gs, FPIRS, RANKS)  # no readout given: must be insightface's
    strict = ijb_1n.identify(pf, ps, gf, gs, FPIRS, RANKS, readout="strict")
    hits, mated, recalls, thresholds, reached = _insightface_1n(sim, ps, gs, FPIRS)
    cmc, tpir = _brute_force_1n(sim, ps, gs, FPIRS, RANKS)
    n = default["num_nonmated"]
    assert all(n * f >= 2 for f in FPIRS)
    for f in FPIRS:
        assert default["threshold_at_fpir"][f] == thresholds[f]
        assert default["tpir_at_fpir"][f] == pytest.approx(recalls[f], abs=1e-12)
        assert default["fpir_at_fpir"][f] == pytest.approx(reached[f], abs=1e-12)
        thr, fp = _strict_threshold(sim, ps, gs, f)
        assert strict["threshold_at_fpir"][f] == thr
        assert strict["tpir_at_fpir"][f] == pytest.approx(tpir[f], abs=1e-12)
        assert strict["fpir_at_fpir"][f] == pytest.approx(fp, abs=1e-12) and fp <= f
        assert default["threshold_at_fpir"][f] > strict["threshold_at_fpir"][f]  # one false alarm fewer
        assert default["fpir_at_fpir"][f] < strict["fpir_at_fpir"][f]
    assert any(default["tpir_at_fpir"][f] != strict["tpir_at_fpir"][f] for f in FPIRS)
    for res in (default, strict):  # rank-k is the same under both
        assert res["rank"] == pytest.approx({k: hits[k] / mated for k in RANKS}, abs=1e-12)
        assert res["rank"] == pytest.approx(cmc, abs=1e-12)


def test_thresholds_agree_below_one_false_alarm():
    """n f < 1: both rules threshold at the highest non-mated score."""
    pf, ps, gf, gs = _random_case(3, n_probe=120)
    a = ijb_1n.identify(pf, ps, gf, gs, (1e-3, 5e-3), RANKS)
    b = ijb_1n.identify(pf, ps, gf, gs, (1e-3, 5e-3), RANKS, readout="strict")
    assert a["num_nonmated"] * 5e-3 < 1
    assert a["threshold_at_fpir"] == b["threshold_at_fpir"] and a["tpir_at_fpir"] == b["tpir_at_fpir"]


def _unequal_protocol(seed):
    """Two galleries of unequal size (20 and 6 subjects), one probe set, template features."""
    rng = np.random.default_rng(seed)
    n_sub = 26
    sub_feat = rng.normal(size=(n_sub, 8))
    g_t = np.arange(n_sub)
    p_subj = np.r_[rng.integers(0, n_sub, 300), rng.integers(0, 6, 40) + 20]
    p_t = np.arange(1000, 1000 + p_subj.size)
    tf = np.concatenate(
        [sub_feat + 0.6 * rng.normal(size=sub_feat.shape), sub_feat[p_subj] + 0.9 * rng.normal(size=(p_subj.size, 8))]
    )
    tf /= np.linalg.norm(tf, axis=1, keepdims=True)
    tids = np.r_[g_t, p_t]
    protocol = {"probe": (p_t, p_subj), "G1": (g_t[:20], g_t[:20]), "G2": (g_t[20:], g_t[20:])}
    return tids, tf, protocol


@pytest.mark.parametrize("seed", [0, 1])
def test_means_over_unequal_galleries(seed):
    tids, tf, protocol = _unequal_protocol(seed)
    default = ijb_1n.evaluate_1n(tids, tf, protocol, FPIRS, RANKS)  # must be insightface's
    strict = ijb_1n.evaluate_1n(tids, tf, protocol, FPIRS, RANKS, readout="strict")
    feat = dict(zip(tids.tolist(), tf))
    p_t, p_s = protocol["probe"]
    pf = np.array([feat[t] for t in p_t])
    per = {}
    for g in ("G1", "G2"):
        g_t, g_s = protocol[g]
        sim = pf @ np.array([feat[t] for t in g_t]).T
        per[g] = (_insightface_1n(sim, p_s, g_s, FPIRS), _brute_force_1n(sim, p_s, g_s, FPIRS, RANKS))
    (h1, m1, r1, _, _), (c1, t1) = per["G1"]
    (h2, m2, r2, _, _), (c2, t2) = per["G2"]
    assert m1 != m2 and m1 + m2 == p_t.size  # every probe is mated in exactly one gallery
    pooled = {k: (h1[k] + h2[k]) / (m1 + m2) for k in RANKS}  # run_model_test_1N's mean
    equal = {k: (c1[k] + c2[k]) / 2 for k in RANKS}
    assert default["mean"]["rank"] == pytest.approx(pooled, abs=1e-12)
    assert strict["mean"]["rank"] == pytest.approx(equal, abs=1e-12)
    assert pooled[1] != pytest.approx(equal[1], abs=1e-6)  # the case separates the two means
    for f in FPIRS:  # TPIR: a plain mean of the galleries under both
        assert default["mean"]["tpir_at_fpir"][f] == pytest.approx((r1[f] + r2[f]) / 2, abs=1e-12)
        assert strict["mean"]["tpir_at_fpir"][f] == pytest.approx((t1[f] + t2[f]) / 2, abs=1e-12)
    assert (default["readout"], default["mean"]["rank_mean"], default["mean"]["tpir_mean"]) == \
        ("insightface", "pooled", "equal-weight")
    assert (strict["readout"], strict["mean"]["rank_mean"], strict["mean"]["tpir_mean"]) == \
        ("strict", "equal-weight", "equal-weight")


def test_bad_readout_and_fpir():
    pf, ps, gf, gs = _random_case(0, n_probe=50)
    with pytest.raises(ValueError, match="readout must be one of"):
        ijb_1n.identify(pf, ps, gf, gs, readout="nearest")
    with pytest.raises(ValueError, match="FPIR target must be in"):
        ijb_1n.identify(pf, ps, gf, gs, fpirs=(1.5,))


@pytest.fixture(scope="module")
def uneven_release(tmp_path_factory):
    """7 subjects: G1 holds 4 (20 mated probes, 15 non-mated), G2 3 (15 mated, 20 non-mated),
    so n f at 1e-1 is 1.5 and 2 (the rules' thresholds differ) and the galleries are unequal."""
    root = tmp_path_factory.mktemp("IJB_release") / "IJBC"
    truth = make_release(root, "IJBC", subjects=7, templates_per_subject=6, seed=11, max_pairs=300)
    return root, truth


def _restated_release(root, truth):
    _, _, tfeat = _independent_scores(root, tiny_net(16))
    split, subj = truth["split"], truth["template_subject"]
    pf = np.array([tfeat[t] for t in split["probe"]])
    ps = np.array([subj[t] + 100 for t in split["probe"]])
    out = {}
    for g in ("G1", "G2"):
        gf = np.array([tfeat[t] for t in split[g]])
        gs = np.array([subj[t] + 100 for t in split[g]])
        out[g] = (_insightface_1n(pf @ gf.T, ps, gs, FPIRS), _brute_force_1n(pf @ gf.T, ps, gs, FPIRS, RANKS),
                  {f: _strict_threshold(pf @ gf.T, ps, gs, f)[0] for f in FPIRS})
    return out


def test_cli_default_is_insightface_1n(uneven_release, tmp_path, capsys):
    """`python -m eval.ijb` without --readout: the 1:N numbers in ijbc.json and the printed table
    are insightface's (threshold rank and pooled mean); --readout strict gives the strict ones."""
    root, truth = uneven_release
    torch.jit.script(tiny_net(16)).save(str(tmp_path / "net.ts"))
    ref = _restated_release(root, truth)
    got = {}
    for extra, ro in (([], "insightface"), (["--readout", "strict"], "strict")):
        out = tmp_path / ro
        assert ijb.main(["--model", str(tmp_path / "net.ts"), "--root", str(root), "--out", str(out), "--workers", "2",
                         "--device", "cpu", "--no-plots"] + extra) == 0
        printed = capsys.readouterr().out
        assert f"1:N (mixed probes), read-out `{ro}`" in printed
        assert ("mean (pooled rank)" in printed) == (ro == "insightface")
        got[ro] = json.loads((out / "ijbc.json").read_text())["identification_1n"]
    ins, strict = got["insightface"], got["strict"]
    assert ins["readout"] == "insightface" and ins["mean"]["rank_mean"] == "pooled"
    key = {1e-2: "1e-2", 1e-1: "1e-1"}
    hits_sum, mated_sum = {k: 0 for k in RANKS}, 0
    for g in ("G1", "G2"):
        (hits, mated, recalls, thresholds, _), (cmc, tpir), strict_thr = ref[g]
        for f in FPIRS:
            assert ins["galleries"][g]["threshold_at_fpir"][key[f]] == pytest.approx(thresholds[f], abs=1e-6)
            assert ins["galleries"][g]["tpir_at_fpir"][key[f]] == pytest.approx(recalls[f], abs=1e-12)
            assert strict["galleries"][g]["threshold_at_fpir"][key[f]] == pytest.approx(strict_thr[f], abs=1e-6)
            assert strict["galleries"][g]["tpir_at_fpir"][key[f]] == pytest.approx(tpir[f], abs=1e-12)
        assert ins["galleries"][g]["threshold_at_fpir"]["1e-1"] != strict["galleries"][g]["threshold_at_fpir"]["1e-1"]
        hits_sum = {k: hits_sum[k] + hits[k] for k in RANKS}
        mated_sum += mated
    pooled = {str(k): hits_sum[k] / mated_sum for k in RANKS}
    equal = {str(k): (ref["G1"][1][0][k] + ref["G2"][1][0][k]) / 2 for k in RANKS}
    assert ins["mean"]["rank"] == pytest.approx(pooled, abs=1e-12)
    assert strict["mean"]["rank"] == pytest.approx(equal, abs=1e-12)
    assert pooled["1"] != pytest.approx(equal["1"], abs=1e-6)
