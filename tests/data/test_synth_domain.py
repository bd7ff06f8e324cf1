"""data_tools synth --domain B: a shifted appearance of the same identities, deterministic,
domain A untouched (its golden hashes are in test_synth_families.py)."""
import numpy as np
import pytest

from data_tools.synth import make_pixels


def test_domain_b_is_deterministic_and_shifted():
    a = make_pixels(0, 3, 1)
    assert np.array_equal(a, make_pixels(0, 3, 1, domain="A"))
    b1, b2 = make_pixels(0, 3, 1, domain="B"), make_pixels(0, 3, 1, domain="B")
    assert np.array_equal(b1, b2)
    assert b1.shape == a.shape and b1.dtype == np.uint8
    # the palette moved: B is far less saturated than A over many images
    def sat(img):
        f = img.astype(np.float32)
        return float((f.max(axis=2) - f.min(axis=2)).mean())
    sa = np.mean([sat(make_pixels(0, t, i)) for t in range(5) for i in range(3)])
    sb = np.mean([sat(make_pixels(0, t, i, domain="B")) for t in range(5) for i in range(3)])
    assert sb < 0.5 * sa, (sa, sb)
    with pytest.raises(ValueError, match="domain"):
        make_pixels(0, 3, 1, domain="C")
