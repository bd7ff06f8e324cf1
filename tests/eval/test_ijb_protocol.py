"""IJB default protocol = insightface's eval_ijbc.py, on a generated IJB-C-layout release
(tests/eval/ijb_release.py): scores against an independent computation with OpenCV-aligned
crops, each switch, the two read-out rules against re-statements, 1:N against brute force."""
import json

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

from eval import ijb, ijb_1n
from eval.metrics import insightface_val_far, tar_fpr_at_far
from tests.eval.fixtures import tiny_net
from tests.eval.ijb_release import make_release


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("IJB_release") / "IJBC"
    truth = make_release(root, "IJBC", subjects=8, seed=3)
    return root, truth


def _lstsq_similarity(src, dst):
    """Least-squares similarity as a linear problem in (a, b, tx, ty) (not Umeyama's SVD)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def _independent_scores(root, model, flip=True, norm_score=True, faceness=True):
    """eval_ijbc.py's steps re-written from its description, image by image."""
    ref = np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655],
                    [62.7299, 92.2041]], dtype=np.float32)
    ref[:, 0] += 8.0
    lines = (root / "meta" / "ijbc_name_5pts_score.txt").read_text().split("\n")
    feats = []
    with torch.no_grad():
        for line in filter(str.strip, lines):
            parts = line.split(" ")
            img = cv2.imread(str(root / "loose_crop" / parts[0]))
            lmk = np.array([float(v) for v in parts[1:-1]], dtype=np.float32).reshape(5, 2)
            m = _lstsq_similarity(lmk.astype(np.float64), ref.astype(np.float64))
            crop = cv2.cvtColor(cv2.warpAffine(img, m, (112, 112), borderValue=0.0), cv2.COLOR_BGR2RGB)
            blob = np.stack([crop.transpose(2, 0, 1), np.fliplr(crop).transpose(2, 0, 1)]).astype(np.float32)
            out = model(torch.from_numpy(blob).div(255).sub(0.5).div(0.5)).numpy()
            f = out[0] + out[1] if flip else out[0]
            if not norm_score:
                f = f / np.linalg.norm(f)
            if faceness:
                f = f * np.float32(parts[-1])
            feats.append(f.astype(np.float64))
    feats = np.array(feats)
    tm = np.loadtxt(root / "meta" / "ijbc_face_tid_mid.txt", dtype=str)
    templates, medias = tm[:, 1].astype(int), tm[:, 2].astype(int)
    tfeat = {}
    for t in np.unique(templates):
        acc = 0
        for md in np.unique(medias[templates == t]):
            acc = acc + feats[(templates == t) & (medias == md)].mean(axis=0)
        tfeat[t] = acc / np.linalg.norm(acc)
    pairs = np.loadtxt(root / "meta" / "ijbc_template_pair_label.txt", dtype=int)
    return np.array([tfeat[a] @ tfeat[b] for a, b, _ in pairs]), pairs[:, 2].astype(bool), tfeat


SWITCHES = [dict(), dict(flip=False), dict(norm_score=False), dict(faceness_weight=False)]


@pytest.mark.parametrize("switches", SWITCHES, ids=["default", "no-flip", "no-norm-score", "no-faceness"])
def test_scores_equal_independent_opencv_computation(release, switches):
    root, _ = release
    net = tiny_net(16)
    res = ijb.evaluate_ijb(net, root, workers=2, progress=False, identification=False, **switches)
    ind, labels, _ = _independent_scores(root, net, flip=switches.get("flip", True),
                                         norm_score=switches.get("norm_score", True),
                                         faceness=switches.get("faceness_weight", True))
    assert np.array_equal(res["labels"], labels)
    assert np.abs(res["scores"] - ind).max() < 1e-5
    assert res["protocol"] == ("insightface" if not switches else
                               "insightface+no-" + next(iter(switches)).replace("_", "-"))


def test_switches_change_the_scores(release):
    root, _ = release
    net = tiny_net(16)
    base = ijb.evaluate_ijb(net, root, workers=2, progress=False, identification=False)["scores"]
    for sw in SWITCHES[1:]:
        other = ijb.evaluate_ijb(net, root, workers=2, progress=False, identification=False, **sw)["scores"]
        assert np.abs(other - base).max() > 1e-3, sw


def test_alignment_is_opencv_exactly(release):
    """norm_crop == cv2.warpAffine with an independently fitted transform, bit for bit, including
    faces that leave the canvas (the black border fades over one pixel as in OpenCV)."""
    from eval.align import norm_crop

    root, _ = release
    lines = [line for line in (root / "meta" / "ijbc_name_5pts_score.txt").read_text().split("\n") if line.strip()]
    ref = np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655],
                    [62.7299, 92.2041]], dtype=np.float32)
    ref[:, 0] += 8.0
    border = 0
    for line in lines[:40]:
        parts = line.split()
        img = cv2.imread(str(root / "loose_crop" / parts[0]))
        lmk = np.array(parts[1:11], dtype=np.float32).reshape(5, 2)
        m = _lstsq_similarity(lmk.astype(np.float64), ref.astype(np.float64))
        expect = cv2.warpAffine(img, m, (112, 112), borderValue=0.0)
        got = norm_crop(img, np.array(parts[1:11], dtype=np.float64))
        assert np.array_equal(got, expect), parts[0]
        border += int((got.sum(axis=2) == 0).any())
    assert border >= 5  # the generator does put faces partly off the canvas


def _insightface_readout(scores, labels, x):
    """eval_ijbc.py's table loop, re-stated: min over (|fpr - x|, index) of the flipped ROC."""
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    _, i = min(list(zip(abs(fpr - x), range(len(fpr)))))
    return tpr[i], fpr[i]


def _strict_readout(scores, labels, x):
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    ok = fpr <= x + 1e-12
    return tpr[ok].max(), fpr[ok].max()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_readouts_against_restatements(seed):
    rng = np.random.default_rng(seed)
    n_imp, n_gen = 3000, 400
    labels = np.r_[np.zeros(n_imp, bool), np.ones(n_gen, bool)]
    scores = np.r_[rng.normal(0, 0.1, n_imp), rng.normal(0.25, 0.12, n_gen)]
    scores = np.round(scores, 3)  # ties, as with real quantised scores
    fars = (1e-4, 1e-3, 3e-3, 1e-2, 1e-1)
    ins = tar_fpr_at_far(scores, labels, fars, readout="insightface")
    strict = tar_fpr_at_far(scores, labels, fars, readout="strict")
    differ = 0
    for f in fars:
        assert ins[f] == pytest.approx(_insightface_readout(scores, labels, f), abs=0)
        assert strict[f] == pytest.approx(_strict_readout(scores, labels, f), abs=1e-12)
        assert strict[f][1] <= f
        differ += ins[f] != strict[f]
    assert differ > 0  # the rules are not the same rule


def test_readout_end_to_end_and_ijb_release(release):
    root, _ = release
    net = tiny_net(16)
    for ro, restate in (("insightface", _insightface_readout), ("strict", _strict_readout)):
        res = ijb.evaluate_ijb(net, root, workers=2, progress=False, identification=False, readout=ro)
        for f in ijb.IJB_FARS:
            tar, fpr = restate(res["scores"], res["labels"], f)
            assert res["tar_at_far"][f] == pytest.approx(tar, abs=1e-12)
            assert res["fpr_at_far"][f] == pytest.approx(fpr, abs=1e-12)


def _brute_force_1n(sim, probe_subj, gal_subj, fpirs, ranks):
    """The strict 1:N read-out by brute force: (CMC {k}, best TPIR with FPIR <= f {f})."""
    subjects = sorted(set(gal_subj.tolist()))
    best = np.array([[max(sim[p, j] for j in range(sim.shape[1]) if gal_subj[j] == s) for s in subjects]
                     for p in range(sim.shape[0])])
    mated = [p for p in range(sim.shape[0]) if probe_subj[p] in subjects]
    nonmated = [p for p in range(sim.shape[0]) if probe_subj[p] not in subjects]
    rank, true = {}, {}
    for p in mated:
        true[p] = best[p, subjects.index(probe_subj[p])]
        rank[p] = sum(1 for v in best[p] if v >= true[p])
    cmc = {k: sum(rank[p] <= k for p in mated) / len(mated) for k in ranks}
    nm_max = [best[p].max() for p in nonmated]
    tpir = {}
    for f in fpirs:
        cands = [-np.inf] + sorted(nm_max)
        best_t = 0.0
        for t in cands:
            if sum(v > t for v in nm_max) / len(nm_max) <= f:
                best_t = max(best_t, sum(rank[p] == 1 and true[p] > t for p in mated) / len(mated))
        tpir[f] = best_t
    return cmc, tpir


@pytest.mark.parametrize("seed", [0, 1])
def test_identify_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    g_subj = np.r_[np.arange(30), rng.integers(0, 30, 10)]  # some subjects with 2+ templates
    p_subj = rng.integers(0, 60, 400)  # half the probes are non-mated
    gf = rng.normal(size=(g_subj.size, 6))
    pf = rng.normal(size=(p_subj.size, 6))
    pf[p_subj < 30] += 1.5 * gf[p_subj[p_subj < 30]]  # mated probes lean to their subject
    gf /= np.linalg.norm(gf, axis=1, keepdims=True)
    pf /= np.linalg.norm(pf, axis=1, keepdims=True)
    fpirs, ranks = (1e-2, 5e-2, 1e-1), (1, 5, 10)
    res = ijb_1n.identify(pf, p_subj, gf, g_subj, fpirs, ranks, readout="strict")
    cmc, tpir = _brute_force_1n(pf @ gf.T, p_subj, g_subj, fpirs, ranks)
    assert res["rank"] == pytest.approx(cmc, abs=1e-12)
    assert res["tpir_at_fpir"] == pytest.approx(tpir, abs=1e-12)
    assert 0 < res["rank"][1] < res["rank"][10] and res["num_nonmated"] > 100
    for f in fpirs:
        assert res["fpir_at_fpir"][f] <= f


def test_1n_on_release_against_brute_force(release):
    root, truth = release
    net = tiny_net(16)
    res = ijb.evaluate_ijb(
        net, root, workers=2, progress=False, readout="strict"
    )  # the default: test_ijb_1n_readout.py
    _, _, tfeat = _independent_scores(root, net)
    one_n = res["identification_1n"]
    assert set(one_n["galleries"]) == {"G1", "G2"}
    split, subj = truth["split"], truth["template_subject"]
    pf = np.array([tfeat[t] for t in split["probe"]])
    ps = np.array([subj[t] + 100 for t in split["probe"]])
    for g in ("G1", "G2"):
        gf = np.array([tfeat[t] for t in split[g]])
        gs = np.array([subj[t] + 100 for t in split[g]])
        cmc, tpir = _brute_force_1n(pf @ gf.T, ps, gs, (1e-2, 1e-1), (1, 5, 10))
        assert one_n["galleries"][g]["rank"] == pytest.approx(cmc, abs=1e-12)
        assert one_n["galleries"][g]["tpir_at_fpir"] == pytest.approx(tpir, abs=1e-12)
        assert one_n["galleries"][g]["num_mated"] == len(split["probe"]) // 2
    assert one_n["mean"]["rank"][1] == pytest.approx(np.mean([one_n["galleries"][g]["rank"][1] for g in ("G1", "G2")]))


def test_1n_files_errors(release, tmp_path):
    import shutil

    root, _ = release
    bad = tmp_path / "IJBC"
    shutil.copytree(root / "meta", bad / "meta")
    assert ijb_1n.read_1n_protocol(bad, "IJBC") is not None
    (bad / "meta" / "ijbc_1N_probe_mixed.csv").write_text("TEMPLATE_ID,SUBJECT_ID\n1,5\n1,6\n")
    with pytest.raises(ValueError, match=r"probe_mixed.csv:3: template 1 has subjects 5 and 6"):
        ijb_1n.read_1n_protocol(bad, "IJBC")
    (bad / "meta" / "ijbc_1N_probe_mixed.csv").write_text("SUBJECT_ID,TEMPLATE_ID\n1,5\n")
    with pytest.raises(ValueError, match="TEMPLATE_ID,SUBJECT_ID"):
        ijb_1n.read_1n_protocol(bad, "IJBC")
    (bad / "meta" / "ijbc_1N_probe_mixed.csv").unlink()
    with pytest.raises(FileNotFoundError, match="probe_mixed.csv"):
        ijb_1n.read_1n_protocol(bad, "IJBC")
    for g in (bad / "meta").glob("*_1N_*"):
        g.unlink()
    assert ijb_1n.read_1n_protocol(bad, "IJBC") is None


def test_cli_protocol_readout_and_saved_scores(release, tmp_path, capsys):
    root, _ = release
    torch.jit.script(tiny_net(16)).save(str(tmp_path / "net.ts"))
    for extra, proto, ro in (
        ([], "insightface", "insightface"),
        (["--readout", "strict", "--no-norm-score"], "insightface+no-norm-score,readout-strict", "strict"),
    ):
        out = tmp_path / ro
        npy = tmp_path / f"{ro}.npy"
        assert ijb.main(["--model", str(tmp_path / "net.ts"), "--root", str(root), "--out", str(out), "--workers", "2",
                         "--device", "cpu", "--no-plots", "--save-scores", str(npy)] + extra) == 0
        printed = capsys.readouterr().out
        assert f"protocol `{proto}`, read-out `{ro}`" in printed and "1:N" in printed
        data = json.loads((out / "ijbc.json").read_text())
        assert data["protocol"] == proto and data["readout"] == ro
        assert set(data["fpr_at_far"]) == set(data["tar_at_far"]) == {"1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"}
        assert "G1" in data["identification_1n"]["galleries"]
        scores = np.load(npy)
        ind, _, _ = _independent_scores(root, tiny_net(16), norm_score=proto == "insightface")
        assert scores.shape == ind.shape and np.abs(scores - ind).max() < 1e-5


def _restated_calculate_val(scores, labels, far_target=1e-3, nfolds=10):
    """insightface's calculate_val, re-stated with loops over the threshold grid; the (FAR,
    threshold) curve interpolated by hand (piecewise linear through the points in order)."""
    dist = 2 - 2 * scores
    thresholds = np.arange(0, 4, 0.001)
    n = scores.size
    bounds = np.r_[0, np.cumsum([n // nfolds + (k < n % nfolds) for k in range(nfolds)])]
    vals, fars = [], []
    for k in range(nfolds):
        test = np.zeros(n, bool)
        test[bounds[k]:bounds[k + 1]] = True
        d, same = dist[~test], labels[~test]
        far_train = np.array([np.sum((d < t) & ~same) / np.sum(~same) for t in thresholds])
        if far_train.max() >= far_target:
            j = np.nonzero(far_train <= far_target)[0].max()  # last grid point at or below
            if far_train[j] == far_target or j + 1 == thresholds.size:
                thr = thresholds[j]
            else:
                w = (far_target - far_train[j]) / (far_train[j + 1] - far_train[j])
                thr = thresholds[j] + w * (thresholds[j + 1] - thresholds[j])
        else:
            thr = 0.0
        d, same = dist[test], labels[test]
        vals.append(np.sum((d < thr) & same) / np.sum(same))
        fars.append(np.sum((d < thr) & ~same) / np.sum(~same))
    return np.mean(vals), np.std(vals), np.mean(fars)


def test_insightface_val_far_against_restatement():
    rng = np.random.default_rng(7)
    labels = np.tile([True, False], 3000)
    scores = np.where(labels, rng.normal(0.5, 0.15, labels.size), rng.normal(0.0, 0.12, labels.size)).clip(-1, 1)
    res = insightface_val_far(scores, labels)
    val, std, far = _restated_calculate_val(scores, labels)
    assert (res["val"], res["val_std"], res["far"]) == pytest.approx((val, std, far), abs=1e-12)
    assert 0 < res["val"] < 1 and len(res["fold_val"]) == 10


def _verify_scripted_net(tmp_path, bin_path) -> int:
    """``eval.verify`` on ``bin_path`` with a TorchScript tiny net, results in ``tmp_path/o``."""
    from eval import verify

    torch.jit.script(tiny_net(16)).save(str(tmp_path / "net.ts"))
    return verify.main(["--model", str(tmp_path / "net.ts"), "--bin", str(bin_path), "--out", str(tmp_path / "o"),
                        "--device", "cpu", "--no-plots"])


def test_verify_cli_reports_insightface_val(tmp_path, capsys):
    from tests.eval.fixtures import make_bin
    from trainer.verification_protocol import embed_images, load_bin, pair_scores

    make_bin(tmp_path / "s.bin", pairs=40, seed=1)
    assert _verify_scripted_net(tmp_path, tmp_path / "s.bin") == 0
    printed = capsys.readouterr().out
    assert "our own definition" in printed and "insightface val@far=1e-3" in printed
    data = json.loads((tmp_path / "o" / "results.json").read_text())["results"]["s"]
    images, issame = load_bin(tmp_path / "s.bin")
    expect = insightface_val_far(pair_scores(embed_images(tiny_net(16), images).numpy()), issame)
    assert data["insightface_val"]["val"] == pytest.approx(expect["val"], abs=1e-12)
    assert data["insightface_val"]["far"] == pytest.approx(expect["far"], abs=1e-12)
    assert "own definition" in data["tar_at_far_definition"]


def test_ijbb_layout_and_pair_subset(tmp_path):
    """IJB-B names its galleries S1/S2; the 1:N part runs on them; a pair subset keeps every genuine pair."""
    root = tmp_path / "IJBB"
    truth = make_release(root, "IJBB", subjects=4, templates_per_subject=3, seed=5, max_pairs=30)
    assert (root / "meta" / "ijbb_1N_gallery_S1.csv").is_file()
    res = ijb.evaluate_ijb(tiny_net(16), root, workers=2, progress=False)
    assert res["target"] == "IJBB" and res["num_pairs"] == truth["num_pairs"] == 30
    assert res["num_genuine"] == 4 * 3
    assert set(res["identification_1n"]["galleries"]) == {"S1", "S2"}


def test_val_far_fold_without_impostors_is_reported_not_fatal(tmp_path, capsys):
    from tests.eval.fixtures import make_bin

    make_bin(tmp_path / "s.bin", pairs=10, seed=2)  # 10 pairs, 10 folds: each test fold has one class
    assert _verify_scripted_net(tmp_path, tmp_path / "s.bin") == 0
    assert "| s | - | - |" in capsys.readouterr().out
    data = json.loads((tmp_path / "o" / "results.json").read_text())["results"]["s"]
    assert "s.bin" in data["insightface_val"]["error"] and "accuracy" in data
    with pytest.raises(ValueError, match="test fold has"):
        insightface_val_far(np.linspace(-1, 1, 10), np.arange(10) % 2 == 0)
