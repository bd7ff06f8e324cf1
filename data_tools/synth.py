"""The project's embedded dataset: identity-structured synthetic 112x112 faces.

Each identity is a fixed draw of facial geometry (face oval, eye spacing/size/
height, brow shape, nose, mouth), colours (skin, hair, eyes, background hue
family) and texture (identity-specific marks and a low-frequency skin pattern).
Each image of an identity varies pose (in-plane rotation, yaw-like horizontal
squash and feature shift, translation), scale, lighting (direction, strength,
colour cast), expression-like deformation (mouth opening/smile, eye opening,
brow raise), blur, noise and a partial occlusion, so telling identities apart
must be learned. Everything is drawn from ``numpy.random.default_rng`` seeded
by (seed, identity, image): the output is deterministic for a seed, whatever
the number of worker processes.

    python -m data_tools synth --out DIR --identities N --images-per-identity K \
        --seed S --label-noise F --val-identities M --val-pairs P \
        [--family-size K --family-spread X --val-family-share Q]

With ``--family-size K`` (> 1) identities come in families of K look-alikes that
share most of their parameters and differ by a fraction X (``--family-spread``);
held-out identities are whole families, a share Q of the val.bin impostor pairs is
drawn within a family, and ``val_pairs.json`` marks them.

``--domain B`` renders the same identities through another "camera" (a shifted
appearance distribution for fine-tuning experiments, docs/finetune.md): colours mostly
desaturated with a green-grey cast and a lifted gamma (an indoor surveillance / NIR-like
look), a stronger one-sided light with a vignette, horizontal line texture, and tighter,
off-centre crops (zoom 1.08-1.22). Its random draws come from their own stream, so
domain A (the default) writes the same bytes as before the option existed.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

SIZE = 112
#: geometry is drawn on a RENDER x RENDER grid and upsampled (bilinear) to SIZE,
#: then sensor noise is added at full resolution: 4x fewer pixels to shade.
RENDER = 56
_YY, _XX = np.mgrid[0:RENDER, 0:RENDER].astype(np.float32)
# canonical coordinates in [-1, 1]
_U0 = (_XX - (RENDER - 1) / 2) / (RENDER / 2)
_V0 = (_YY - (RENDER - 1) / 2) / (RENDER / 2)


def _draw_params(r: np.random.Generator) -> Dict[str, Any]:
    """One independent draw of every identity parameter from ``r``."""
    skin = np.array([0.55, 0.42, 0.33]) + r.uniform(-0.25, 0.3) + r.normal(0, 0.06, 3)
    out = {
        "face_a": r.uniform(0.52, 0.70),  # half width
        "face_b": r.uniform(0.70, 0.88),  # half height
        "jaw": r.uniform(-0.25, 0.25),  # chin narrowing
        "skin": np.clip(skin, 0.05, 0.95),
        "hair": np.clip(r.uniform(0.0, 0.7, 3) * r.uniform(0.2, 1.0), 0, 1),
        "hairline": r.uniform(-0.75, -0.35),
        "hair_side": r.uniform(0.0, 0.2),
        "eye_dx": r.uniform(0.20, 0.34),
        "eye_y": r.uniform(-0.22, -0.04),
        "eye_r": r.uniform(0.06, 0.11),
        "eye_aspect": r.uniform(0.45, 0.8),
        "iris": np.clip(r.uniform(0.0, 0.6, 3), 0, 1),
        "brow_dy": r.uniform(0.10, 0.2),
        "brow_w": r.uniform(0.08, 0.16),
        "brow_t": r.uniform(0.015, 0.045),
        "brow_tilt": r.uniform(-0.25, 0.25),
        "nose_len": r.uniform(0.15, 0.32),
        "nose_w": r.uniform(0.05, 0.11),
        "mouth_y": r.uniform(0.30, 0.48),
        "mouth_w": r.uniform(0.14, 0.28),
        "lip": np.clip(np.array([0.65, 0.3, 0.3]) + r.normal(0, 0.08, 3), 0, 1),
        "marks": r.uniform([-0.5, -0.4, 0.015], [0.5, 0.6, 0.04], size=(int(r.integers(1, 5)), 3)),
        "tex_f": r.uniform(2.0, 7.0, 2),
        "tex_p": r.uniform(0, 2 * np.pi, 2),
        "tex_a": r.uniform(0.02, 0.08),
    }
    return {k: (np.asarray(v, np.float32) if isinstance(v, np.ndarray) else np.float32(v)) for k, v in out.items()}


def family_of(identity, family_size: int = 1):
    """Family index of ``identity`` (int or array): identities ``f*K .. f*K+K-1`` form family ``f``."""
    if family_size < 1:
        raise ValueError(f"family_size must be >= 1, got {family_size}")
    return (
        np.asarray(identity) // family_size
        if not isinstance(identity, (int, np.integer))
        else int(identity) // family_size
    )


def identity_params(
    seed: int, identity: int, family_size: int = 1, family_spread: float = 1.0
) -> Dict[str, np.ndarray]:
    """The parameters of ``identity``.

    ``family_size`` 1 (the default): an independent draw per identity. ``family_size``
    K > 1: identities ``f*K .. f*K+K-1`` are one family (look-alikes, as siblings are).
    The family has its own draw ``b`` (seeded by (seed, family)) and each member its
    independent draw ``o`` (the one it would have with K = 1); with spread ``x`` in
    [0, 1] every continuous parameter of the member is ``(1 - x) * b + x * o`` (a
    convex combination, so it stays in the parameter's range), and its identity marks
    (a variable-length list) are its own with probability ``x``, else the family's.
    ``x`` = 0: all members identical; ``x`` = 1: as unrelated as independent identities.
    """
    own = _draw_params(np.random.default_rng([seed, 1, identity]))
    if family_size == 1:
        return own
    if not 0.0 <= family_spread <= 1.0:
        raise ValueError(f"family_spread must be in [0, 1], got {family_spread}")
    base = _draw_params(np.random.default_rng([seed, 5, int(family_of(int(identity), family_size))]))
    x = np.float32(family_spread)
    out = {k: ((1 - x) * base[k] + x * own[k]).astype(np.float32) for k in base if k != "marks"}
    use_own = np.random.default_rng([seed, 6, identity]).random() < family_spread
    out["marks"] = own["marks"] if use_own else base["marks"]
    return out


def param_vector(p: Dict[str, np.ndarray]) -> np.ndarray:
    """The continuous parameters of ``p`` as one flat vector (marks left out: variable length)."""
    return np.concatenate([np.ravel(p[k]) for k in sorted(p) if k != "marks"]).astype(np.float64)


_NOISE = None


def _noise_bank() -> np.ndarray:
    """16 fixed unit-Gaussian noise fields (same in every process); images pick and shift one."""
    global _NOISE
    if _NOISE is None:
        _NOISE = np.random.default_rng(12345).standard_normal((16, SIZE, SIZE, 3), dtype=np.float32)
    return _NOISE


def _soft(d: np.ndarray, edge: float = 0.02) -> np.ndarray:
    """Soft inside mask of a signed 'distance' d (<0 inside)."""
    return np.clip(0.5 - d / (2 * edge), 0.0, 1.0)


def _lerp(img: np.ndarray, colour, mask: np.ndarray) -> None:
    """In place: img = img * (1 - mask) + colour * mask."""
    m = mask[..., None]
    img += (np.asarray(colour, np.float32) - img) * m


def _ellipse(u, v, cx, cy, a, b):
    return np.sqrt(((u - cx) / a) ** 2 + ((v - cy) / b) ** 2) - 1.0


def render(p: Dict[str, np.ndarray], r: np.random.Generator) -> np.ndarray:
    """One image (uint8 HxWx3) of identity ``p`` with per-image variation from ``r``."""
    # ---- pose: rotation, scale, translation, yaw-like squash
    ang = r.normal(0, 0.16)
    scale = r.uniform(0.88, 1.12)
    tx, ty = (float(x) for x in r.normal(0, 0.05, 2))
    yaw = r.uniform(-0.35, 0.35)
    c, s = float(np.cos(ang)), float(np.sin(ang))
    u = (c * (_U0 - tx) + s * (_V0 - ty)) / scale
    v = (-s * (_U0 - tx) + c * (_V0 - ty)) / scale
    u = u / (1 - 0.25 * abs(yaw))
    feat_shift = 0.22 * yaw  # features move toward the turned side
    # ---- expression
    mouth_open = max(0.0, r.normal(0.01, 0.025))
    smile = r.normal(0.0, 0.06)
    eye_open = r.uniform(0.55, 1.1)
    brow_raise = r.normal(0, 0.02)

    img = np.empty((RENDER, RENDER, 3), np.float32)
    bg_grad = 0.15 * (_V0[..., None])
    img[:] = np.clip(r.uniform(0.1, 0.9, 3).astype(np.float32) + bg_grad, 0, 1)  # per image, not identity

    # face with chin narrowing
    a = p["face_a"] * (1 - p["jaw"] * np.clip(v, 0, 1))
    face = _soft(_ellipse(u, v, 0, 0.05, a, p["face_b"]), 0.03)
    tex = p["tex_a"] * np.sin(p["tex_f"][0] * u * np.pi + p["tex_p"][0]) * np.sin(
        p["tex_f"][1] * v * np.pi + p["tex_p"][1]
    )
    skin = p["skin"][None, None, :] * (1 + tex[..., None])
    _lerp(img, skin, face)

    # hair: region above hairline inside a slightly larger oval, plus sides
    head = _soft(_ellipse(u, v, 0, 0.0, p["face_a"] + 0.08, p["face_b"] + 0.08), 0.03)
    side = _soft(np.maximum(p["face_a"] - p["hair_side"] - np.abs(u), v - 0.1), 0.03)
    hair = head * np.maximum(_soft(v - p["hairline"], 0.04), side)
    _lerp(img, p["hair"][None, None, :], hair)

    uf = u - feat_shift
    # identity marks (moles)
    for mx, my, mr in p["marks"]:
        m = _soft(_ellipse(uf, v, mx, my, mr, mr), 0.01) * face
        _lerp(img, p["skin"] * 0.35, 0.7 * m)
    # eyes, irises, brows
    for side in (-1.0, 1.0):
        ex, ey = side * p["eye_dx"], p["eye_y"]
        eb = p["eye_r"] * p["eye_aspect"] * eye_open
        white = _soft(_ellipse(uf, v, ex, ey, p["eye_r"], max(eb, 0.01)), 0.012)
        _lerp(img, 0.92, white)
        iris = _soft(_ellipse(uf, v, ex + 0.3 * feat_shift, ey, p["eye_r"] * 0.5, p["eye_r"] * 0.5), 0.01) * white
        _lerp(img, p["iris"], iris)
        by = ey - p["brow_dy"] - brow_raise + side * p["brow_tilt"] * (uf - ex)
        brow = _soft(np.maximum(np.abs(v - by) - p["brow_t"], np.abs(uf - ex) - p["brow_w"]), 0.012)
        _lerp(img, p["hair"] * 0.8, brow)
    # nose: darker vertical wedge + nostrils
    ny0 = p["eye_y"] + 0.05
    nose = _soft(
        np.maximum(
            np.abs(uf) - p["nose_w"] * np.clip((v - ny0) / p["nose_len"], 0.2, 1),
            np.abs(v - ny0 - p["nose_len"] / 2) - p["nose_len"] / 2,
        ),
        0.02,
    )
    img = img * (1 - 0.25 * nose[..., None])
    # mouth: curved band, opening with expression
    my = p["mouth_y"] - smile * (1 - (uf / p["mouth_w"]) ** 2) * 0.5
    mouth = _soft(np.maximum(np.abs(v - my) - (0.018 + mouth_open), np.abs(uf) - p["mouth_w"]), 0.012)
    _lerp(img, p["lip"], mouth)
    inner = _soft(np.maximum(np.abs(v - my) - mouth_open * 0.8, np.abs(uf) - p["mouth_w"] * 0.8), 0.01) * (
        mouth_open > 0.01
    )
    _lerp(img, 0.08, inner)

    # ---- lighting: directional gradient + colour cast + brightness
    ld = r.uniform(0, 2 * np.pi)
    light = 1 + r.uniform(0.0, 0.45) * (float(np.cos(ld)) * _U0 + float(np.sin(ld)) * _V0)
    cast = ((1 + r.normal(0, 0.06, 3)) * r.uniform(0.7, 1.25)).astype(np.float32)
    img = img * light[..., None].astype(np.float32) * cast

    # ---- occlusion (sunglasses-like bar, hand-like blob or a corner patch)
    if r.random() < 0.35:
        kind = r.integers(0, 3)
        col = r.uniform(0, 1, 3).astype(np.float32)
        if kind == 0:
            oy = p["eye_y"] + r.normal(0, 0.03)
            occ = _soft(np.abs(v - oy) - r.uniform(0.06, 0.1), 0.01) * _soft(np.abs(u) - 0.55, 0.01)
        elif kind == 1:
            occ = _soft(
                _ellipse(
                    _U0, _V0, r.uniform(-0.6, 0.6), r.uniform(0.2, 0.8), r.uniform(0.2, 0.4), r.uniform(0.15, 0.35)
                ),
                0.03,
            )
        else:
            cx, cy = (float(x) for x in r.choice([-1.0, 1.0], 2))
            occ = _soft(np.maximum(-(_U0 * cx) + 0.45, -(_V0 * cy) + 0.45), 0.02)
        _lerp(img, col, occ)

    # ---- blur (box, radius 0-1 at render resolution = 0-2 at SIZE), upsample, sensor noise
    rad = int(r.integers(0, 2)) if r.random() < 0.6 else 0
    if rad:
        k = 2 * rad + 1
        pad = np.pad(img, ((rad, rad), (rad, rad), (0, 0)), mode="edge")
        cs = np.cumsum(np.cumsum(pad, 0), 1)
        cs = np.pad(cs, ((1, 0), (1, 0), (0, 0)))
        img = (cs[k:, k:] - cs[:-k, k:] - cs[k:, :-k] + cs[:-k, :-k]) / (k * k)
    assert img.dtype == np.float32, img.dtype
    small = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
    big = np.asarray(small.resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.float32)
    bank = _noise_bank()
    noise = bank[int(r.integers(0, bank.shape[0]))]
    noise = np.roll(noise, (int(r.integers(0, SIZE)), int(r.integers(0, SIZE))), axis=(0, 1))
    big += np.float32(r.uniform(1.0, 10.0)) * noise
    return np.clip(big + 0.5, 0, 255).astype(np.uint8)


DOMAINS = ("A", "B")


def domain_b(img: np.ndarray, r: np.random.Generator) -> np.ndarray:
    """Domain B's appearance (module docstring) applied to a domain-A image (uint8 HxWx3)."""
    h, w = img.shape[:2]
    zoom = r.uniform(1.08, 1.22)
    ch, cw = int(round(h / zoom)), int(round(w / zoom))
    y0 = int(r.integers(0, h - ch + 1))
    x0 = int(r.integers(0, w - cw + 1))
    crop = Image.fromarray(np.ascontiguousarray(img[y0:y0 + ch, x0:x0 + cw]))
    g = np.asarray(crop.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    grey = g.mean(axis=2, keepdims=True)
    g = 0.25 * g + 0.75 * grey
    g = g * np.array([0.88, 1.04, 0.86], np.float32)
    g = np.clip(g, 0, 1) ** np.float32(0.8)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = (xx - w / 2) / (w / 2), (yy - h / 2) / (h / 2)
    ang = r.uniform(0, 2 * np.pi)
    light = 1 + r.uniform(0.3, 0.7) * (np.cos(ang) * u + np.sin(ang) * v)
    vignette = 1 - 0.35 * (u ** 2 + v ** 2) / 2
    g = g * (light * vignette)[..., None]
    g = g * (1 - 0.08 * (yy.astype(np.int64) % 3 == 0))[..., None]
    return np.clip(g * 255 + 0.5, 0, 255).astype(np.uint8)


def encode(img: np.ndarray, quality: int = 90) -> bytes:
    from trainer.io.images import encode_jpeg  # simplejpeg, or Pillow where it is missing

    return encode_jpeg(img, quality=quality)


_PCACHE: Dict[tuple, Dict[str, np.ndarray]] = {}


def make_image(seed: int, identity: int, index: int, family_size: int = 1, family_spread: float = 1.0,
               domain: str = "A") -> bytes:
    """Encoded JPEG of image ``index`` of ``identity`` (deterministic)."""
    return encode(make_pixels(seed, identity, index, family_size, family_spread, domain))


def make_pixels(seed: int, identity: int, index: int, family_size: int = 1, family_spread: float = 1.0,
                domain: str = "A") -> np.ndarray:
    """Image ``index`` of ``identity`` as uint8 HxWx3, before JPEG encoding."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    key = (seed, identity, family_size, float(family_spread) if family_size > 1 else 1.0)
    p = _PCACHE.get(key)
    if p is None:
        if len(_PCACHE) > 4096:
            _PCACHE.clear()
        p = _PCACHE[key] = identity_params(seed, identity, family_size, family_spread)
    img = render(p, np.random.default_rng([seed, 2, identity, index]))
    if domain == "B":
        img = domain_b(img, np.random.default_rng([seed, 7, identity, index]))
    return img


def _work(job: tuple) -> bytes:
    return make_image(*job)


def _images(jobs: Sequence[Tuple[int, int, int]], workers: int):
    if workers <= 1 or len(jobs) < 64:
        for j in jobs:
            yield _work(j)
        return
    ctx = mp.get_context("fork")
    with ctx.Pool(workers) as pool:
        yield from pool.imap(_work, jobs, chunksize=32)


def generate_dataset(
    out_dir,
    identities: int,
    images_per_identity: int,
    seed: int = 0,
    label_noise: float = 0.0,
    val_identities: int = 0,
    val_pairs: int = 0,
    workers: Optional[int] = None,
    shuffle: bool = True,
    progress: bool = False,
    family_size: int = 1,
    family_spread: float = 0.25,
    val_family_share: float = 0.5,
    domain: str = "A",
) -> dict:
    """Write ``train.rec``, ``train.idx``, ``property`` (and ``val.bin``) under ``out_dir``.

    Training identities are 0..identities-1; validation identities are
    ``identities .. identities+val_identities-1`` (never in training). A
    ``label_noise`` share of training images is given a wrong (different,
    random) label. ``val_pairs`` pairs: half genuine, half impostor.
    Returns a summary dict (includes ``noisy_keys``: source indices relabelled).

    ``family_size`` K > 1 groups identities into families of look-alikes
    (:func:`identity_params`, ``family_spread``); both identity counts must be
    multiples of K, so validation families are held out whole. Then a
    ``val_family_share`` of the impostor pairs (rounded) is drawn within a held-out
    family and the rest across two different families, and ``val_pairs.json``
    records each pair's identities, whether it is genuine and whether it is a
    within-family impostor, in ``val.bin`` order. K = 1 (the default) writes the
    same bytes as before families existed.
    """
    from data_tools.layout import write_face_rec
    from trainer.io.atomic import atomic_open
    from trainer.io.binfile import write_bin

    if identities < 1 or images_per_identity < 1:
        raise ValueError("need at least one identity and one image per identity")
    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {label_noise}")
    if val_pairs and val_identities < 2:
        raise ValueError("val pairs need at least 2 validation identities (impostor pairs)")
    if val_pairs % 2:
        raise ValueError("val_pairs must be even (half genuine, half impostor)")
    if family_size < 1:
        raise ValueError(f"family_size must be >= 1, got {family_size}")
    if family_size > 1:
        if identities % family_size or val_identities % family_size:
            raise ValueError(f"with family_size {family_size}, identities ({identities}) and val_identities "
                             f"({val_identities}) must be multiples of it (families are held out whole)")
        if not 0.0 <= family_spread <= 1.0:
            raise ValueError(f"family_spread must be in [0, 1], got {family_spread}")
        if not 0.0 <= val_family_share <= 1.0:
            raise ValueError(f"val_family_share must be in [0, 1], got {val_family_share}")
        if val_pairs and val_family_share < 1.0 and val_identities < 2 * family_size:
            raise ValueError("across-family impostor pairs need at least 2 validation families")
    workers = workers or min(2, os.cpu_count() or 1)
    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    true = np.repeat(np.arange(identities), images_per_identity)
    index = np.tile(np.arange(images_per_identity), identities)
    labels = true.copy()
    r = np.random.default_rng([seed, 3])
    n_noisy = int(round(label_noise * labels.size)) if identities > 1 else 0
    noisy = np.sort(r.choice(labels.size, n_noisy, replace=False)) if n_noisy else np.zeros(0, np.int64)
    if n_noisy:
        off = r.integers(1, identities, n_noisy)
        labels[noisy] = (true[noisy] + off) % identities
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    fam = (family_size, float(family_spread)) if family_size > 1 else ()
    if domain != "A":
        fam = (family_size, float(family_spread), domain)
    jobs_all = [(seed, int(t), int(i), *fam) for t, i in zip(true, index)]

    def payloads(src):
        return _images([jobs_all[k] for k in src], workers)

    summary = write_face_rec(
        out_dir, labels, identities, payloads,
        shuffle_seed=(seed if shuffle else None),
        progress=("synth train" if progress else None),
    )
    summary["noisy_images"] = n_noisy
    if val_pairs:
        vr = np.random.default_rng([seed, 4])
        ids = identities + np.arange(val_identities)
        half = val_pairs // 2
        pairs: List[Tuple[Tuple[int, int], Tuple[int, int], bool]] = []
        for k in range(half):
            a = int(vr.choice(ids))
            pairs.append(((a, 2 * k), (a, 2 * k + 1), True))
        if family_size == 1:
            for k in range(half):
                a, b = vr.choice(ids, 2, replace=False)
                pairs.append(((int(a), 2 * half + 2 * k), (int(b), 2 * half + 2 * k + 1), False))
        else:
            n_within = int(round(val_family_share * half))
            fams = np.unique(family_of(ids, family_size))
            for k in range(half):
                if k < n_within:  # two different members of one held-out family
                    f = int(vr.choice(fams))
                    a, b = f * family_size + vr.choice(family_size, 2, replace=False)
                else:  # members of two different held-out families
                    f, g = vr.choice(fams, 2, replace=False)
                    a = f * family_size + int(vr.integers(family_size))
                    b = g * family_size + int(vr.integers(family_size))
                pairs.append(((int(a), 2 * half + 2 * k), (int(b), 2 * half + 2 * k + 1), False))
        order = vr.permutation(len(pairs))
        pairs = [pairs[i] for i in order]
        jobs = []
        for (a, ia), (b, ib), _ in pairs:
            jobs += [(seed, a, 100000 + ia, *fam), (seed, b, 100000 + ib, *fam)]
        it = _images(jobs, workers)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=len(jobs), desc="synth val.bin", unit="img")
        write_bin(out_dir / "val.bin", list(it), [p[2] for p in pairs])
        summary.update(val_pairs=val_pairs, val_genuine=half, val_impostor=half, val_identities=val_identities)
        if family_size > 1:
            within = [bool(not same and family_of(a, family_size) == family_of(b, family_size))
                      for (a, _), (b, _), same in pairs]
            side = {"family_size": family_size, "family_spread": float(family_spread),
                    "val_family_share": float(val_family_share),
                    "fields": ["identity_a", "identity_b", "genuine", "within_family_impostor"],
                    "pairs": [[a, b, bool(same), w] for ((a, _), (b, _), same), w in zip(pairs, within)]}
            with atomic_open(out_dir / "val_pairs.json", "w") as f:
                json.dump(side, f)
            summary.update(val_within_family_impostor=int(sum(within)))
    summary["seconds"] = round(time.time() - t0, 2)
    return summary


def add_parser(sub) -> None:
    p = sub.add_parser("synth", help="generate the synthetic identity-structured face dataset",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (train.rec, train.idx, property, val.bin)")
    p.add_argument("--identities", type=int, default=200)
    p.add_argument("--images-per-identity", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label-noise", type=float, default=0.0, help="share of training images given a wrong label")
    p.add_argument("--val-identities", type=int, default=50, help="held-out identities for val.bin")
    p.add_argument("--val-pairs", type=int, default=400, help="verification pairs (half genuine, half impostor)")
    p.add_argument("--family-size", type=int, default=1,
                   help="identities per family of look-alikes (1: every identity independent, the default)")
    p.add_argument("--family-spread", type=float, default=0.25,
                   help="with --family-size > 1: how far members differ, 0 (identical) .. 1 (unrelated)")
    p.add_argument("--val-family-share", type=float, default=0.5,
                   help="with --family-size > 1: share of val.bin impostor pairs drawn within a family")
    p.add_argument("--workers", type=int, default=None, help="processes (default: min(2, cores))")
    p.add_argument("--domain", choices=DOMAINS, default="A",
                   help="appearance domain: A (default) or B (shifted colours, light, texture, crops)")
    p.add_argument(
        "--sorted",
        action="store_true",
        help="store image records in identity order (like insightface) instead of shuffled",
    )
    p.set_defaults(func=_main)


def _main(a) -> int:
    s = generate_dataset(a.out, a.identities, a.images_per_identity, a.seed, a.label_noise,
                         a.val_identities, a.val_pairs, workers=a.workers, shuffle=not a.sorted, progress=True,
                         family_size=a.family_size, family_spread=a.family_spread,
                         val_family_share=a.val_family_share, domain=a.domain)
    print(
        f"synth: {s['images']} images of {s['identities']} identities ({s['noisy_images']} with noisy labels) "
        f"-> {a.out}/train.rec, train.idx, property"
        + (f"; val.bin: {s['val_pairs']} pairs ({s['val_genuine']} genuine, {s['val_impostor']} impostor) "
           f"of {s['val_identities']} held-out identities" if s.get("val_pairs") else "")
        + (f", {s['val_within_family_impostor']} impostor pairs within a family (val_pairs.json)"
           if "val_within_family_impostor" in s else "")
        + f"; {s['seconds']} s"
    )
    return 0
