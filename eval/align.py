"""5-point face alignment to insightface's 112x112 ArcFace template.

A similarity transform (rotation, uniform scale, translation) is fitted from the five
detected landmarks (left eye, right eye, nose tip, left mouth corner, right mouth
corner, in image pixels) to the reference points below by least squares (Umeyama
1991, the estimator skimage's SimilarityTransform uses), then the image is warped
with bilinear sampling and black borders, as ``cv2.warpAffine`` does in insightface's
``norm_crop``.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

# insightface's arcface reference landmarks for a 112x112 crop (pixel-centre coordinates)
ARCFACE_REF = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


def umeyama_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 matrix M of the similarity transform minimising sum ||dst - M [src; 1]||^2."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"landmarks must be matching [K>=2, 2] arrays, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    cov = dc.T @ sc / src.shape[0]
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(cov) < 0:
        d[-1] = -1.0
    rot = u @ np.diag(d) @ vt
    var_s = (sc**2).sum() / src.shape[0]
    if var_s <= 0:
        raise ValueError("degenerate landmarks (all points equal)")
    scale = float((sig * d).sum() / var_s)
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def warp_affine(img: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """``cv2.warpAffine(img, m, (size, size))`` (bilinear, black border) with Pillow.

    ``m`` maps input pixel coordinates to output ones (OpenCV convention: pixel centres
    at integers). Pillow wants the output->input map in its own convention (centres
    at +0.5), hence the inverse and the half-pixel shifts.
    """
    full = np.vstack([m, [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(full)
    a, b, c = inv[0]
    d, e, f = inv[1]
    c = c - 0.5 * (a + b) + 0.5
    f = f - 0.5 * (d + e) + 0.5
    pil = Image.fromarray(np.ascontiguousarray(img))
    out = pil.transform((size, size), Image.AFFINE, data=(a, b, c, d, e, f), resample=Image.BILINEAR, fillcolor=(0, 0, 0))
    return np.asarray(out)


def norm_crop(img: np.ndarray, landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """Aligned ``image_size`` x ``image_size`` RGB crop (image_size a multiple of 112)."""
    if image_size % 112:
        raise ValueError(f"image_size must be a multiple of 112, got {image_size}")
    lm = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    m = umeyama_similarity(lm, ARCFACE_REF * (image_size / 112.0))
    return warp_affine(img, m, image_size)
