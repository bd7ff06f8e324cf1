"""5-point face alignment to insightface's 112x112 ArcFace template.

A similarity transform (rotation, uniform scale, translation) is fitted from the five
detected landmarks (left eye, right eye, nose tip, left mouth corner, right mouth
corner, in image pixels) to the reference points below by least squares (Umeyama
1991, the estimator skimage's SimilarityTransform uses), then the image is warped with
OpenCV's own ``cv2.warpAffine`` (bilinear, constant black border), exactly as
insightface's ``eval_ijbc.py`` / ``norm_crop`` do. OpenCV interpolates in fixed point
(1/32 pixel steps), rounds to nearest and fades the border over one pixel; no other
library reproduces that bit for bit, so we call it rather than re-implement it.

Landmarks and reference points are rounded to float32 before the fit, as insightface
parses them (``np.float32`` landmarks, float32 reference ``[30.2946, ...] + 8``), so the
transform is the reference's to the last bit that can change a fixed-point sample.
"""
from __future__ import annotations

import numpy as np

# insightface's arcface reference landmarks for a 112x112 crop (pixel-centre coordinates)
ARCFACE_REF = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


def _arcface_ref_float32() -> np.ndarray:
    """The reference points as insightface's eval_ijbc.py builds them (float32, x + 8)."""
    ref = np.array(
        [[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655], [62.7299, 92.2041]],
        dtype=np.float32,
    )
    ref[:, 0] += np.float32(8.0)
    return ref.astype(np.float64)


ARCFACE_REF_F32 = _arcface_ref_float32()


def _cv2():
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - a requirement
        raise ImportError("eval.align needs OpenCV: pip install 'opencv-python-headless>=4.8,<6'") from e
    return cv2


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
    """``cv2.warpAffine(img, m, (size, size), borderValue=0.0)``: bilinear, black border.

    ``m`` maps input pixel coordinates to output ones (pixel centres at integers).
    Works on any channel order (the warp is per channel).
    """
    img = np.ascontiguousarray(img)
    return _cv2().warpAffine(img, np.asarray(m, dtype=np.float64), (int(size), int(size)), borderValue=0.0)


def similarity_to_template(landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """The 2x3 transform of 5 landmarks onto the ArcFace template, fitted as insightface does."""
    if image_size % 112:
        raise ValueError(f"image_size must be a multiple of 112, got {image_size}")
    lm = np.asarray(landmarks, dtype=np.float32).astype(np.float64).reshape(5, 2)
    return umeyama_similarity(lm, ARCFACE_REF_F32 * (image_size / 112.0))


def norm_crop(img: np.ndarray, landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """Aligned ``image_size`` x ``image_size`` crop (image_size a multiple of 112), same channel order as ``img``."""
    return warp_affine(img, similarity_to_template(landmarks, image_size), image_size)
