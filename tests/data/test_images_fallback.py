"""trainer.io.images without simplejpeg (a GPU machine's software set may lack it): JPEG is
decoded by OpenCV (or Pillow) and encoded by Pillow, with one warning; same pixels within a
grey level or two, same errors naming the source."""
import numpy as np
import pytest

from trainer.io import images


@pytest.fixture
def no_simplejpeg(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "simplejpeg", None)  # `import simplejpeg` raises ImportError
    monkeypatch.setattr(images, "_SJ", ...)
    with pytest.warns(RuntimeWarning, match="simplejpeg is not installed"):
        assert images._simplejpeg() is None
    yield


def _picture(h=40, w=56):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 4 % 256, y * 6 % 256, (x + y) * 2 % 256], axis=-1).astype(np.uint8)


def test_decode_without_simplejpeg_matches_simplejpeg():
    pytest.importorskip("simplejpeg")
    img = _picture()
    data = images.encode_jpeg(img, quality=95)
    ref = images.decode_rgb(data)
    saved = images._SJ
    try:
        images._SJ = None  # as if the import had failed
        got = images.decode_rgb(data, size=(40, 56))
        buf = np.zeros((40, 56, 3), np.uint8)
        same_buf = images.decode_rgb(data, size=(40, 56), out=buf)
        assert images.jpeg_size(data) == (40, 56)
    finally:
        images._SJ = saved
    assert got.shape == ref.shape == (40, 56, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 2
    assert same_buf is buf and np.array_equal(buf, got)


def test_without_simplejpeg_encode_decode_and_errors(no_simplejpeg):
    img = _picture()
    data = images.encode_jpeg(img, quality=95)  # Pillow
    assert images.is_jpeg(data) and images.jpeg_size(data) == (40, 56)
    got = images.decode_rgb(data, size=(40, 56))
    assert np.abs(got.astype(int) - img.astype(int)).mean() < 4  # a JPEG of the picture
    with pytest.raises(images.ImageDecodeError, match="rec 7: image is 56x40, expected 30x30"):
        images.decode_rgb(data, where="rec 7", size=(30, 30), out=np.zeros((30, 30, 3), np.uint8))
    with pytest.raises(images.ImageDecodeError, match="rec 9: undecodable"):
        images.decode_rgb(images.JPEG_SOI + b"\x00" * 50, where="rec 9")
