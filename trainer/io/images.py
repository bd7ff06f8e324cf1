"""The one image decoder of the project: encoded bytes -> RGB ``uint8`` [H, W, 3].

JPEG goes through simplejpeg (libjpeg-turbo), anything else (PNG, BMP, ...)
through Pillow. Used by the training loaders, ``data_tools`` (validate,
folder2rec, make_bin, synth) and evaluation (``.bin`` sets, IJB crops).

Without simplejpeg (a GPU machine's software set may lack it) JPEG falls back
to OpenCV's decoder (libjpeg-turbo too; Pillow when OpenCV is missing) and
encoding to Pillow, with one warning: the loaders and tools still run, decoding
a little slower; pixels may differ by a grey level from simplejpeg's.

Two policies for a JPEG that libjpeg-turbo rejects:
- ``lenient=False`` (training data, ``data_tools validate``): it is an error, so
  every tool gives one verdict on a damaged record;
- ``lenient=True`` (evaluation inputs made by others): Pillow gets a second try
  (CMYK and other flavours simplejpeg does not handle).
"""
from __future__ import annotations

import io
import warnings
from typing import Any, Optional, Tuple

import numpy as np

JPEG_SOI = b"\xff\xd8"
_SJ: Any = ...  # simplejpeg, or None when it is not installed (decided on first use)


def _simplejpeg():
    """The simplejpeg module, or None (then a warning, once per process)."""
    global _SJ
    if _SJ is ...:
        try:
            import simplejpeg
            _SJ = simplejpeg
        except ImportError:
            _SJ = None
            warnings.warn("simplejpeg is not installed: JPEG decoding falls back to OpenCV (or Pillow) and "
                          "encoding to Pillow (slower; install simplejpeg for the loaders' full speed)",
                          RuntimeWarning, stacklevel=3)
    return _SJ


def _fallback_jpeg(data: bytes) -> np.ndarray:
    """JPEG -> RGB uint8 without simplejpeg: OpenCV, else Pillow. Raises on undecodable bytes."""
    try:
        import cv2
    except ImportError:
        return _pillow(data)
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("OpenCV could not decode the JPEG")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


class ImageDecodeError(ValueError):
    """Bytes that are no decodable image (or not of the expected size); names the source."""


def is_jpeg(data: bytes) -> bool:
    return data[:2] == JPEG_SOI


def jpeg_size(data: bytes, where: str = "image") -> Tuple[int, int]:
    """(height, width) from a JPEG header, without decoding."""
    sj = _simplejpeg()
    try:
        if sj is None:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                w, h = im.size
        else:
            w, h, _, _ = sj.decode_jpeg_header(data)
    except Exception as e:  # noqa: BLE001 - any decoder error becomes one naming the record
        raise ImageDecodeError(f"{where}: undecodable JPEG ({type(e).__name__}: {e})") from None
    return h, w


def _pillow(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def decode_rgb(data: bytes, where: str = "image", size: Optional[Tuple[int, int]] = None,
               out: Optional[np.ndarray] = None, lenient: bool = False) -> np.ndarray:
    """Decode to RGB uint8 [H, W, 3].

    ``size`` (height, width): the image must have it (an error otherwise; no resize).
    ``out``: a contiguous [H, W, 3] uint8 buffer to decode a JPEG into (needs ``size``).
    ``where`` names the file/record in every error (:class:`ImageDecodeError`).
    """
    if not data:
        raise ImageDecodeError(f"{where}: empty image")
    sj = _simplejpeg()
    img = None
    try:
        if is_jpeg(data):
            try:
                if out is not None and size is not None:
                    h, w = jpeg_size(data, where)
                    if (h, w) != tuple(size):
                        raise ImageDecodeError(f"{where}: image is {w}x{h}, expected {size[1]}x{size[0]}")
                    if sj is None:
                        out[...] = _fallback_jpeg(data)
                        return out
                    return sj.decode_jpeg(data, colorspace="RGB", buffer=out)
                img = _fallback_jpeg(data) if sj is None else sj.decode_jpeg(data, colorspace="RGB")
            except ImageDecodeError:
                raise
            except Exception:
                if not lenient:
                    raise
        if img is None:
            img = _pillow(data)
    except ImageDecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder error becomes one naming the record
        raise ImageDecodeError(f"{where}: undecodable image ({len(data)} bytes; {type(e).__name__}: {e})") from None
    if size is not None and img.shape[:2] != tuple(size):
        raise ImageDecodeError(f"{where}: image is {img.shape[1]}x{img.shape[0]}, expected {size[1]}x{size[0]}")
    return img


def resize_rgb(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of an RGB array to ``size`` x ``size`` (no-op when already that size)."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))


def encode_jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    """RGB uint8 [H, W, 3] -> JPEG bytes (simplejpeg; Pillow without it)."""
    sj = _simplejpeg()
    if sj is None:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img)).save(buf, format="JPEG", quality=quality)
        return buf.getvalue()
    return sj.encode_jpeg(np.ascontiguousarray(img), quality=quality, colorspace="RGB")
