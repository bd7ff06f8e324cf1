"""IJB 1:1 on a miniature release built from synthetic faces: meta parsing, 5-point alignment,
media/template aggregation, pair scores, TAR@FAR vs an independent computation, CLI + report."""
import json
import shutil

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

from eval import ijb
from eval.align import ARCFACE_REF, norm_crop, umeyama_similarity, warp_affine
from tests.eval.fixtures import PatchNet, find_dots, loose_crop, make_ijb, tiny_net


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("IJB_release") / "IJBC"
    truth = make_ijb(root, "IJBC", identities=6, seed=0)
    return root, truth


def test_umeyama_recovers_known_similarity():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 200, size=(5, 2))
    a, s, t = 0.4, 1.7, np.array([12.0, -30.0])
    R = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    dst = s * src @ R.T + t
    M = umeyama_similarity(src, dst)
    assert np.allclose(M[:, :2], s * R) and np.allclose(M[:, 2], t)
    with pytest.raises(ValueError):
        umeyama_similarity(np.zeros((5, 2)), dst)


def test_umeyama_matches_skimage():
    trans = pytest.importorskip("skimage.transform")
    rng = np.random.default_rng(1)
    src = ARCFACE_REF * 1.8 + rng.normal(0, 3, (5, 2)) + 20
    if hasattr(trans.SimilarityTransform, "from_estimate"):
        ref = trans.SimilarityTransform.from_estimate(src, ARCFACE_REF)
    else:
        ref = trans.SimilarityTransform()
        ref.estimate(src, ARCFACE_REF)
    assert np.allclose(umeyama_similarity(src, ARCFACE_REF), ref.params[:2], atol=1e-9)


def test_warp_is_cv2():
    import cv2

    img, lmk = loose_crop(1, np.random.default_rng(2))
    M = umeyama_similarity(lmk, ARCFACE_REF)
    assert np.array_equal(warp_affine(img, M, 112), cv2.warpAffine(img, M, (112, 112), borderValue=0.0))


def test_alignment_puts_landmarks_on_reference_points():
    rng = np.random.default_rng(3)
    for ident in range(4):
        img, lmk = loose_crop(ident, rng)
        aligned = norm_crop(img, lmk)
        assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
        assert np.abs(find_dots(aligned) - ARCFACE_REF).max() < 0.6
    big = norm_crop(img, lmk, image_size=224)
    assert np.abs(find_dots(big) - 2 * ARCFACE_REF).max() < 1.2


def test_read_meta(release):
    root, truth = release
    meta = ijb.read_ijb_meta(root)
    assert meta.target == "IJBC" and len(meta.names) == truth["num_images"]
    assert meta.landmarks.shape == (truth["num_images"], 5, 2)
    assert meta.pairs.shape == (truth["num_pairs"], 2)
    assert meta.labels.sum() == 6  # one genuine pair per identity (2 templates each)
    assert np.allclose(meta.faceness, [truth["faceness"][n] for n in meta.names], atol=1e-4)


def test_meta_errors_name_the_file(release, tmp_path):
    root, _ = release
    bad = tmp_path / "IJBC"
    shutil.copytree(root / "meta", bad / "meta")
    with open(bad / "meta" / "ijbc_template_pair_label.txt", "a") as f:
        f.write("1 99999 0\n")
    with pytest.raises(ValueError, match=r"template_pair_label.txt.*99999"):
        ijb.read_ijb_meta(bad)
    (bad / "meta" / "ijbc_name_5pts_score.txt").write_text("1.jpg 1 2 3\n")
    with pytest.raises(ValueError, match=r"name_5pts_score.txt:1: expected 12 columns"):
        ijb.read_ijb_meta(bad)
    (bad / "meta" / "ijbc_face_tid_mid.txt").unlink()
    with pytest.raises(FileNotFoundError, match="ijbc_face_tid_mid.txt"):
        ijb.read_ijb_meta(bad)


def _naive_templates(feats, templates, medias, weights):
    out = {}
    for t in np.unique(templates):
        acc = 0
        for m in np.unique(medias[templates == t]):
            sel = (templates == t) & (medias == m)
            acc = acc + (feats[sel] * weights[sel, None]).mean(axis=0)
        out[int(t)] = acc / np.linalg.norm(acc)
    return out


@pytest.mark.parametrize("weighted", [False, True])
def test_aggregation_and_scores_against_naive_loops(weighted):
    rng = np.random.default_rng(4)
    n, d = 40, 8
    feats = rng.normal(size=(n, d))
    templates = rng.integers(1, 7, n)
    medias = rng.integers(0, 3, n) + 10 * templates  # medias nested in templates
    medias[:5] = 999  # one media shared by several templates: counted per (template, media)
    w = rng.uniform(0.3, 1.0, n)
    tids, tf = ijb.aggregate_templates(feats.astype(np.float32), templates, medias, w if weighted else None, chunk=7)
    naive = _naive_templates(feats, templates, medias, w if weighted else np.ones(n))
    assert tids.tolist() == sorted(naive)
    for t, f in zip(tids, tf):
        assert np.allclose(f, naive[int(t)], atol=1e-6)
    with pytest.raises(ValueError, match="40 features but 39 template ids"):
        ijb.aggregate_templates(feats, templates[:-1], medias)
    pairs = np.array([[tids[0], tids[1]], [tids[2], tids[2]], [tids[-1], tids[0]]])
    s = ijb.score_pairs(tids, tf, pairs)
    assert np.allclose(s, [naive[int(a)] @ naive[int(b)] for a, b in pairs])
    with pytest.raises(ValueError, match="unknown template"):
        ijb.score_pairs(tids, tf, np.array([[tids[0], 12345]]))


def test_end_to_end_perfect_model(release):
    root, truth = release
    res = ijb.evaluate_ijb(PatchNet(), root, workers=2, progress=False)
    assert res["num_templates"] == 12 and res["num_pairs"] == truth["num_pairs"]
    assert res["auc"] == 1.0
    assert set(res["tar_at_far"]) == {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1}
    assert all(v == 1.0 for v in res["tar_at_far"].values())
    # genuine template pairs score high, impostors low: the aligned identity grid was recovered
    assert res["scores"][res["labels"]].min() > 0.9 > 0.6 > res["scores"][~res["labels"]].max()


def test_alignment_matters(release, tmp_path):
    """Same release with every landmark set replaced by a fixed one: crops misaligned, scores drop."""
    root, _ = release
    bad = tmp_path / "IJBC"
    shutil.copytree(root / "meta", bad / "meta")
    (bad / "loose_crop").symlink_to(root / "loose_crop")
    lines = (root / "meta" / "ijbc_name_5pts_score.txt").read_text().split("\n")
    fixed = " ".join(f"{v:.2f}" for v in (ARCFACE_REF + 30).reshape(-1))
    (bad / "meta" / "ijbc_name_5pts_score.txt").write_text(
        "\n".join(f"{line.split()[0]} {fixed} {line.split()[-1]}" for line in lines if line.strip()) + "\n"
    )
    good = ijb.evaluate_ijb(PatchNet(), root, workers=2, progress=False, readout="strict")
    misaligned = ijb.evaluate_ijb(PatchNet(), bad, workers=2, progress=False, readout="strict")
    def gap(r):
        return r["scores"][r["labels"]].mean() - r["scores"][~r["labels"]].mean()

    assert gap(misaligned) < gap(good) - 0.2
    assert good["auc"] == 1.0 and misaligned["auc"] < 1.0
    assert misaligned["tar_at_far"][1e-2] < good["tar_at_far"][1e-2] == 1.0


@pytest.mark.parametrize("faceness", [False, True])
def test_tar_at_far_against_independent_computation(release, faceness):
    root, _ = release
    res = ijb.evaluate_ijb(tiny_net(16), root, faceness_weight=faceness, workers=2, progress=False, readout="strict")
    # independent: template features by loops over the meta files, ROC from scikit-learn
    meta = ijb.read_ijb_meta(root)
    feats = ijb.embed_ijb(tiny_net(16), meta, batch_size=5, workers=1, progress=False)  # raw (norm score)
    naive = _naive_templates(feats.astype(np.float64), meta.templates, meta.medias,
                             meta.faceness if faceness else np.ones(len(meta.names)))
    scores = np.array([naive[int(a)] @ naive[int(b)] for a, b in meta.pairs])
    assert np.allclose(res["scores"], scores, atol=1e-6)
    fpr, tpr, _ = roc_curve(meta.labels, scores, drop_intermediate=False)
    for far, tar in res["tar_at_far"].items():
        assert tar == pytest.approx(tpr[fpr <= far + 1e-12].max(), abs=1e-12)


def test_cli_writes_report(release, tmp_path, capsys):
    root, _ = release
    torch.jit.script(PatchNet()).save(str(tmp_path / "patch.ts"))
    out = tmp_path / "out"
    assert ijb.main(["--model", str(tmp_path / "patch.ts"), "--root", str(root), "--out", str(out),
                     "--faceness-weight", "--workers", "2", "--device", "cpu"]) == 0
    assert "| IJBC (faceness) | 100.00 (0.00e+00) |" in capsys.readouterr().out
    data = json.loads((out / "ijbc.json").read_text())
    assert data["tar_at_far"]["1e-4"] == 1.0 and data["num_templates"] == 12
    assert len(data["roc"]["far"]) == len(data["roc"]["tar"]) > 0
    for f in ("ijbc.md", "ijbc_roc.png", "ijbc_hist.png"):
        assert (out / f).stat().st_size > 1000 or f.endswith(".md")
