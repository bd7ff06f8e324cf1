"""Image decoding for evaluation: JPEG via simplejpeg, anything else via Pillow."""
from __future__ import annotations

import io

import numpy as np
import simplejpeg
from PIL import Image


def decode_rgb(data: bytes, where: str = "image") -> np.ndarray:
    """Decode encoded bytes to an RGB ``uint8`` array [H, W, 3].

    ``where`` names the source (file, record) in the error raised for undecodable data.
    """
    if simplejpeg.is_jpeg(data):
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except Exception:  # some JPEG flavours (CMYK, progressive quirks): let Pillow try
            pass
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:
        raise ValueError(f"{where}: cannot decode image ({len(data)} bytes): {e}") from e


def resize_rgb(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of an RGB array to ``size`` x ``size`` (no-op when already that size)."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
