"""Optional training augmentations (the set arcface_torch users know), both backends.

Each is applied to a sample with its own probability; all default to off.
``augment`` in :func:`trainer.data.build_train_loader` may be an
:class:`AugmentConfig`, a dict of its fields, or None.

* resize_prob: downscale to ``resize_min``..1 of the side, then back up (low-resolution faces)
* blur_prob:   Gaussian blur, sigma in [0.1, blur_sigma]
* hsv_prob:    hue shift ±hue (degrees), saturation and value scale 1±sat / 1±val
* gray_prob:   convert to grayscale (3 equal channels)

The two backends draw different random numbers: they agree in distribution,
not sample by sample (the exact-equality test runs with augmentations off).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional, Union

import numpy as np


@dataclass
class AugmentConfig:
    resize_prob: float = 0.0
    resize_min: float = 0.4
    blur_prob: float = 0.0
    blur_sigma: float = 1.5
    hsv_prob: float = 0.0
    hue: float = 10.0
    sat: float = 0.3
    val: float = 0.3
    gray_prob: float = 0.0

    def active(self) -> bool:
        return any(getattr(self, k) > 0 for k in ("resize_prob", "blur_prob", "hsv_prob", "gray_prob"))

    @classmethod
    def coerce(cls, value: Union[None, AugmentConfig, Mapping[str, Any]]) -> Optional[AugmentConfig]:
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            known = {f.name for f in fields(cls)}
            bad = sorted(set(value) - known)
            if bad:
                raise ValueError(f"unknown augment key(s) {bad}; known: {sorted(known)}")
            return cls(**value)
        raise TypeError(f"augment must be None, a dict or AugmentConfig, got {type(value).__name__}")

    def to_dict(self) -> dict:
        return asdict(self)


def _gray(img: np.ndarray) -> np.ndarray:
    g = img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.repeat(np.clip(g + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def apply_numpy(img: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Augment one RGB uint8 HxWx3 image (torch fallback path)."""
    from PIL import Image, ImageFilter

    h, w = img.shape[:2]
    if cfg.resize_prob > 0 and rng.random() < cfg.resize_prob:
        f = rng.uniform(cfg.resize_min, 1.0)
        small = Image.fromarray(img).resize((max(1, int(w * f)), max(1, int(h * f))), Image.Resampling.BILINEAR)
        img = np.asarray(small.resize((w, h), Image.Resampling.BILINEAR))
    if cfg.blur_prob > 0 and rng.random() < cfg.blur_prob:
        img = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(rng.uniform(0.1, cfg.blur_sigma))))
    if cfg.hsv_prob > 0 and rng.random() < cfg.hsv_prob:
        hsv = np.asarray(Image.fromarray(img).convert("HSV")).astype(np.float32)
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(-cfg.hue, cfg.hue) * 256 / 360) % 256
        hsv[..., 1] *= rng.uniform(1 - cfg.sat, 1 + cfg.sat)
        hsv[..., 2] *= rng.uniform(1 - cfg.val, 1 + cfg.val)
        img = np.asarray(Image.fromarray(np.clip(hsv, 0, 255).astype(np.uint8), "HSV").convert("RGB"))
    if cfg.gray_prob > 0 and rng.random() < cfg.gray_prob:
        img = _gray(img)
    return np.ascontiguousarray(img)


def apply_dali(images, cfg: AugmentConfig, device: str, size):
    """The same augmentations as DALI operators (images: HWC uint8 DataNode)."""
    import nvidia.dali

    # DALI's operators are generated at import time; its type stubs lack most of them
    fn: Any = nvidia.dali.fn
    types: Any = nvidia.dali.types

    h, w = size
    if cfg.resize_prob > 0:
        do = fn.random.coin_flip(probability=cfg.resize_prob, dtype=types.BOOL)
        f = fn.random.uniform(range=[cfg.resize_min, 1.0])
        f = f * fn.cast(do, dtype=types.FLOAT) + (1.0 - fn.cast(do, dtype=types.FLOAT))
        small = fn.resize(images, resize_x=f * w, resize_y=f * h)
        images = fn.resize(small, resize_x=float(w), resize_y=float(h))
    if cfg.blur_prob > 0:
        do = fn.cast(fn.random.coin_flip(probability=cfg.blur_prob), dtype=types.FLOAT)
        sigma = fn.random.uniform(range=[0.1, cfg.blur_sigma]) * do + 1e-3 * (1.0 - do)
        images = fn.gaussian_blur(images, sigma=sigma, window_size=7)
    if cfg.hsv_prob > 0:
        do = fn.cast(fn.random.coin_flip(probability=cfg.hsv_prob), dtype=types.FLOAT)
        hue = fn.random.uniform(range=[-cfg.hue, cfg.hue]) * do
        sat = fn.random.uniform(range=[-cfg.sat, cfg.sat]) * do + 1.0
        val = fn.random.uniform(range=[-cfg.val, cfg.val]) * do + 1.0
        images = fn.hsv(images, hue=hue, saturation=sat, value=val)
    if cfg.gray_prob > 0:
        do = fn.cast(fn.random.coin_flip(probability=cfg.gray_prob), dtype=types.FLOAT)
        images = fn.saturation(images, saturation=1.0 - do)
    return images
