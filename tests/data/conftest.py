import shutil

import pytest

from data_tools.synth import generate_dataset


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """16 identities x 6 images, shuffled physical order, val.bin of 8 pairs (read-only: copy to modify)."""
    d = tmp_path_factory.mktemp("synth")
    generate_dataset(d, identities=16, images_per_identity=6, seed=3, label_noise=0.0,
                     val_identities=4, val_pairs=8, workers=1)
    return d


@pytest.fixture
def synth_copy(synth_dir, tmp_path):
    d = tmp_path / "ds"
    shutil.copytree(synth_dir, d)
    return d


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # label-scan / image-index cache per test, so corrupted copies never reuse a clean scan
    monkeypatch.setenv("UNPG_DATA_CACHE", str(tmp_path / "cache"))
