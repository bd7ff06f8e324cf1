"""Generator of an IJB-C-layout release for tests (1:1 and 1:N meta files).

Subjects come in look-alike families (a family's 4x4 colour grid, perturbed per subject),
with a fine texture over the face so interpolation details show. A loose crop is the
aligned face mapped by a random similarity transform (rotation up to +-40 degrees, scale
0.8-1.7 of the 112 template) into a noisy canvas, placed so the face can stick out of the
canvas; its landmarks are the transform applied to the template points plus detector-like
noise (0.5 px). Faceness scores vary (0.05-1.0). Templates have 1-3 medias of 1-3
images. The 1:N split: the first template of each subject is enrolled in gallery G1
(even subjects) or G2 (odd subjects); every other template is a mixed probe.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import cv2
import numpy as np

from eval.align import ARCFACE_REF

CANVAS = (150, 170)  # H, W


def subject_face(subject: int, family_size: int, rng: np.random.Generator, seed: int) -> np.ndarray:
    """Aligned 112x112 RGB face: family grid + subject offset + per-image noise and texture."""
    fam = np.random.default_rng(1000 * seed + subject // family_size).integers(50, 200, (4, 4, 3)).astype(np.float64)
    own = np.random.default_rng(1000 * seed + 500 + subject).normal(0, 18, (4, 4, 3))
    grid = np.clip(fam + own + rng.normal(0, 6, (4, 4, 3)), 0, 255)
    img = np.full((112, 112, 3), 120.0)
    img[16:96, 16:96] = np.kron(grid, np.ones((20, 20, 1)))
    img += rng.normal(0, 12, img.shape)  # texture: every pixel differs from its neighbours
    return np.clip(img, 0, 255).astype(np.uint8)


def loose_crop(face: np.ndarray, rng: np.random.Generator):
    """(canvas RGB uint8, landmarks [5,2]) with the face under a random similarity transform."""
    h, w = CANVAS
    ang = np.deg2rad(rng.uniform(-40, 40))
    s = rng.uniform(0.8, 1.7)
    rot = s * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    centre = np.array([56.0, 62.0])
    # face centre anywhere such that up to ~35 % of the face may leave the canvas
    half = 56 * s
    c = np.array([rng.uniform(0.65 * half, w - 0.65 * half) if w > 1.3 * half else w / 2,
                  rng.uniform(0.65 * half, h - 0.65 * half) if h > 1.3 * half else h / 2])
    if rng.random() < 0.3:  # push some faces further out
        c += rng.choice([-1, 1], 2) * 0.35 * half
    m = np.zeros((2, 3))
    m[:, :2] = rot
    m[:, 2] = c - rot @ centre
    warped = cv2.warpAffine(face, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    mask = cv2.warpAffine(np.full((112, 112), 255, np.uint8), m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
    bg = rng.integers(60, 190, (h, w, 3)).astype(np.float64)
    a = mask[..., None] / 255.0
    img = np.clip(a * warped + (1 - a) * bg, 0, 255).astype(np.uint8)
    lmk = ARCFACE_REF @ rot.T + m[:, 2] + rng.normal(0, 0.5, (5, 2))
    return img, lmk


def make_release(
    root: Path,
    target: str = "IJBC",
    subjects: int = 8,
    family_size: int = 2,
    templates_per_subject: int = 3,
    seed: int = 0,
    one_n: bool = True,
    max_pairs: int = 0,
) -> Dict[str, object]:
    """Write ``root/loose_crop`` and ``root/meta`` (1:1 files; 1:N csvs when ``one_n``).

    Pairs: every template pair, or (``max_pairs`` > 0) all genuine pairs plus random
    impostor pairs up to ``max_pairs`` in all."""
    rng = np.random.default_rng(seed)
    t = target.lower()
    (root / "loose_crop").mkdir(parents=True, exist_ok=True)
    (root / "meta").mkdir(parents=True, exist_ok=True)
    tid_lines, lmk_lines = [], []
    template_subject: Dict[int, int] = {}
    template_images: Dict[int, list] = {}
    img_no, media_no, tid = 1, 1, 1
    for subj in range(subjects):
        for _ in range(templates_per_subject):
            template_subject[tid] = subj
            template_images[tid] = []
            for _m in range(int(rng.integers(1, 4))):
                for _i in range(int(rng.integers(1, 4))):
                    name = f"{img_no}.jpg"
                    img, lmk = loose_crop(subject_face(subj, family_size, rng, seed), rng)
                    ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
                    assert ok
                    (root / "loose_crop" / name).write_bytes(buf.tobytes())
                    score = float(rng.choice([rng.uniform(0.05, 0.3), rng.uniform(0.5, 1.0)], p=[0.2, 0.8]))
                    tid_lines.append(f"{name} {tid} {media_no}")
                    lmk_lines.append(name + " " + " ".join(f"{v:.3f}" for v in lmk.reshape(-1)) + f" {score:.6f}")
                    template_images[tid].append(name)
                    img_no += 1
                media_no += 1
            tid += 1
    tids = sorted(template_subject)
    pair_lines = [
        f"{a} {b} {int(template_subject[a] == template_subject[b])}" for i, a in enumerate(tids) for b in tids[i + 1 :]
    ]
    if max_pairs and len(pair_lines) > max_pairs:
        gen = [p for p in pair_lines if p.endswith(" 1")]
        imp = [p for p in pair_lines if p.endswith(" 0")]
        keep = rng.choice(len(imp), size=max(0, max_pairs - len(gen)), replace=False)
        pair_lines = gen + [imp[i] for i in sorted(keep)]
    rng.shuffle(pair_lines)
    (root / "meta" / f"{t}_face_tid_mid.txt").write_text("\n".join(tid_lines) + "\n")
    (root / "meta" / f"{t}_name_5pts_score.txt").write_text("\n".join(lmk_lines) + "\n")
    (root / "meta" / f"{t}_template_pair_label.txt").write_text("\n".join(pair_lines) + "\n")
    split = {"G1": [], "G2": [], "probe": []}
    for tid_ in tids:
        subj = template_subject[tid_]
        first = tid_ == min(k for k, v in template_subject.items() if v == subj)
        split[("G1" if subj % 2 == 0 else "G2") if first else "probe"].append(tid_)
    if one_n:
        names = {"G1": "gallery_G1", "G2": "gallery_G2", "probe": "probe_mixed"} if t == "ijbc" else \
                {"G1": "gallery_S1", "G2": "gallery_S2", "probe": "probe_mixed"}
        for key, fname in names.items():
            rows = ["TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID"]
            for tid_ in split[key]:
                rows += [
                    f"{tid_},{template_subject[tid_] + 100},img/{n},{k}" for k, n in enumerate(template_images[tid_])
                ]
            (root / "meta" / f"{t}_1N_{fname}.csv").write_text("\n".join(rows) + "\n")
    return {
        "template_subject": template_subject,
        "num_images": img_no - 1,
        "num_pairs": len(pair_lines),
        "split": split,
    }


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m tests.eval.ijb_release", description="write a generated IJB-layout release"
    )
    p.add_argument("--root", required=True, help="e.g. /tmp/IJB_release/IJBC (the folder name gives the target)")
    p.add_argument("--subjects", type=int, default=30)
    p.add_argument("--family-size", type=int, default=3)
    p.add_argument("--templates-per-subject", type=int, default=6)
    p.add_argument("--max-pairs", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    root = Path(a.root)
    t = make_release(
        root, root.name.upper(), a.subjects, a.family_size, a.templates_per_subject, a.seed, max_pairs=a.max_pairs
    )
    print(
        f"{root}: {a.subjects} subjects, {len(t['template_subject'])} templates, {t['num_images']} images, "
        f"{t['num_pairs']} pairs"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
