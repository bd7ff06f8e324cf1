"""Synthetic faces, tiny models, a tiny .bin and a miniature IJB release for eval tests.

Faces: a 112x112 "aligned" face whose identity is a 4x4 grid of muted colours over the
central region [16, 96), with five saturated landmark dots at insightface's ArcFace
reference points. ``PatchNet`` reads exactly that grid, so it separates identities
perfectly on aligned faces and poorly on misaligned ones. Loose IJB crops are made with
Pillow's resize/rotate/paste (independent of eval/align.py) and their landmarks are
*detected* as the centroids of the dot colours, so they are right by construction.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from eval.align import ARCFACE_REF
from trainer.io.binfile import write_bin

DOT_COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255]], dtype=np.float64)


def identity_grid(identity: int, seed: int = 0) -> np.ndarray:
    """The identity's 4x4x3 colours (muted: 40..200, never near the dot colours)."""
    rng = np.random.default_rng(10_000 * seed + identity)
    return rng.integers(40, 200, size=(4, 4, 3)).astype(np.uint8)


def aligned_face(
    identity: int, scale: int = 1, rng: np.random.Generator | None = None, dots: bool = True
) -> np.ndarray:
    """An aligned synthetic face (112*scale square, RGB uint8), small per-image noise if ``rng``."""
    s = 112 * scale
    grid = identity_grid(identity).astype(np.float64)
    if rng is not None:
        grid = np.clip(grid * rng.uniform(0.9, 1.1) + rng.normal(0, 4, size=grid.shape), 0, 255)
    img = np.full((s, s, 3), 128, dtype=np.uint8)
    cell = 20 * scale
    o = 16 * scale
    img[o : o + 4 * cell, o : o + 4 * cell] = np.kron(grid, np.ones((cell, cell, 1))).astype(np.uint8)
    pil = Image.fromarray(img)
    if dots:
        draw = ImageDraw.Draw(pil)
        r = 2.5 * scale
        for (x, y), c in zip(ARCFACE_REF * scale, DOT_COLOURS.astype(int)):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in c))
    return np.asarray(pil)


def find_dots(img: np.ndarray, min_weight: float = 2.0) -> np.ndarray:
    """Landmarks [5, 2] as intensity-weighted centroids of the five dot colours (pixel centres at integers)."""
    f = img.astype(np.float64)
    ys, xs = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
    out = np.zeros((5, 2))
    for k, c in enumerate(DOT_COLOURS):
        d = np.linalg.norm(f - c, axis=2)
        w = np.clip(1.0 - d / 90.0, 0, None) ** 2  # only near-saturated pixels count
        if w.sum() < min_weight:
            raise ValueError(f"dot {k} not found")
        out[k] = [(w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()]
    return out


def loose_crop(identity: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """(image, landmarks): the face scaled, rotated and placed at random in a 200x180 noisy canvas."""
    face = Image.fromarray(aligned_face(identity, scale=2, rng=rng))
    size = int(224 * rng.uniform(0.5, 0.7))
    face = face.resize((size, size), Image.BILINEAR)
    # rotate a mask with the face so the corners outside it show the background
    angle = rng.uniform(-30, 30)
    face = face.rotate(angle, resample=Image.BILINEAR, expand=True)
    mask = Image.new("L", (size, size), 255).rotate(angle, resample=Image.NEAREST, expand=True)
    canvas = Image.fromarray(rng.integers(90, 160, size=(180, 200, 3)).astype(np.uint8))
    x0 = int(rng.integers(0, max(1, 200 - face.size[0])))
    y0 = int(rng.integers(0, max(1, 180 - face.size[1])))
    canvas.paste(face, (x0, y0), mask)
    img = np.asarray(canvas)
    return img, find_dots(img)


class PatchNet(torch.nn.Module):
    """Reads the 4x4 identity grid of an aligned face: [N,3,112,112] -> [N,48], centred per sample."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # cells are 20 px; average their inner 12x12 so dots and edges barely matter
        inner = x[:, :, 16:96, 16:96].reshape(x.shape[0], 3, 4, 20, 4, 20)[:, :, :, 4:16, :, 4:16]
        f = inner.mean(dim=(3, 5)).reshape(x.shape[0], -1)
        return f - f.mean(dim=1, keepdim=True)


def patch_net() -> torch.nn.Module:
    """``module:factory`` entry for CLI tests."""
    return PatchNet()


class TinyNet(torch.nn.Module):
    """A small conv net with BatchNorm (insightface-like tail: fc + BatchNorm1d ``features``)."""

    def __init__(self, num_features: int = 32, width: int = 8):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False),
            torch.nn.BatchNorm2d(width),
            torch.nn.PReLU(width),
            torch.nn.Conv2d(width, 16, 3, stride=2, padding=1, bias=False),
            torch.nn.BatchNorm2d(16),
            torch.nn.PReLU(16),
            torch.nn.AdaptiveAvgPool2d(4),
            torch.nn.Flatten(),
        )
        self.fc = torch.nn.Linear(16 * 16, num_features)
        self.features = torch.nn.BatchNorm1d(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(self.body(x)))


def tiny_net(num_features: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    net = TinyNet(num_features)
    # non-trivial BN statistics so eval mode matters
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def encode(img: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_bin(path: Path, pairs: int = 20, seed: int = 0, size: int = 112, png_every: int = 0) -> np.ndarray:
    """A tiny verification .bin of aligned synthetic faces; half the pairs genuine, alternating.

    ``size`` != 112 stores resized images (load_bin must resize back); ``png_every`` = k
    stores every k-th image as PNG (decoder fallback). Returns issame.
    """
    rng = np.random.default_rng(seed)
    imgs: List[bytes] = []
    issame = []
    nid = 0
    for k in range(pairs):
        same = k % 2 == 0
        a = nid
        b = nid if same else nid + 1
        nid += 1 if same else 2
        for j, ident in enumerate((a, b)):
            img = aligned_face(ident, rng=rng)
            if size != 112:
                img = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
            fmt = "PNG" if png_every and (2 * k + j) % png_every == 0 else "JPEG"
            imgs.append(encode(img, fmt))
        issame.append(same)
    write_bin(path, imgs, issame)
    return np.array(issame)


def make_ijb(root: Path, target: str = "IJBC", identities: int = 6, seed: int = 0) -> Dict[str, object]:
    """A miniature IJB release under ``root`` (loose_crop/ + meta/). Per identity 2 templates, each
    with 2 medias of 1-2 images; all template pairs listed with labels. Returns the ground truth."""
    rng = np.random.default_rng(seed)
    (root / "loose_crop").mkdir(parents=True, exist_ok=True)
    (root / "meta").mkdir(parents=True, exist_ok=True)
    t = target.lower()
    tid_lines, lmk_lines = [], []
    template_identity: Dict[int, int] = {}
    img_no, media_no, tid = 1, 100, 1
    faceness = {}
    for ident in range(identities):
        for _ in range(2):
            template_identity[tid] = ident
            for _m in range(2):
                for _i in range(int(rng.integers(1, 3))):
                    name = f"{img_no}.jpg"
                    img, lmk = loose_crop(ident, rng)
                    (root / "loose_crop" / name).write_bytes(encode(img))
                    score = float(rng.uniform(0.5, 1.0))
                    faceness[name] = score
                    tid_lines.append(f"{name} {tid} {media_no}")
                    lmk_lines.append(name + " " + " ".join(f"{v:.3f}" for v in lmk.reshape(-1)) + f" {score:.4f}")
                    img_no += 1
                media_no += 1
            tid += 1
    tids = sorted(template_identity)
    pair_lines = []
    for i, a in enumerate(tids):
        for b in tids[i + 1 :]:
            pair_lines.append(f"{a} {b} {int(template_identity[a] == template_identity[b])}")
    (root / "meta" / f"{t}_face_tid_mid.txt").write_text("\n".join(tid_lines) + "\n")
    (root / "meta" / f"{t}_name_5pts_score.txt").write_text("\n".join(lmk_lines) + "\n")
    (root / "meta" / f"{t}_template_pair_label.txt").write_text("\n".join(pair_lines) + "\n")
    return {
        "template_identity": template_identity,
        "num_images": img_no - 1,
        "num_pairs": len(pair_lines),
        "faceness": faceness,
    }
