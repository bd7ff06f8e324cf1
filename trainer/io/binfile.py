"""insightface verification ``.bin`` files (lfw.bin, cfp_fp.bin, agedb_30.bin, ...).

Format (docs/design.md §3): a pickle of ``(bins, issame_list)``; ``bins`` holds 2P
encoded images, pair k is (bins[2k], bins[2k+1]). A pickle can run code, so
files are read with a restricted unpickler that only rebuilds bytes, lists,
tuples, bools, ints (plus ``_codecs.encode(str, 'latin1')``, which is how Python 3
writes bytes at pickle protocol <= 2) and nothing else.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import List, Sequence, Tuple

from trainer.io.atomic import atomic_open


class UnsafePickleError(ValueError):
    """The file asks the unpickler to build an object we do not allow."""


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise UnsafePickleError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r}) in a verification .bin")
    return text.encode("latin1")


class _RestrictedUnpickler(pickle.Unpickler):
    # Plain containers and bytes need no find_class at all; every global lookup
    # (which is how a pickle runs code) is refused. Python 2 pickles written by
    # insightface store images as `str` -> decoded with encoding='bytes'.
    def __init__(self, file, path: str):
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            # Python 3 pickles of bytes at protocol <= 2 rebuild them as
            # _codecs.encode(str, 'latin1'); allow exactly that and nothing else.
            return _latin1_encode
        raise UnsafePickleError(
            f"{self._path}: refusing to load global '{module}.{name}' from a verification .bin "
            "(only bytes, lists, tuples and bools are allowed)"
        )


def read_bin(path: str | Path) -> Tuple[List[bytes], List[bool]]:
    """Return ``(encoded_images, issame)`` with ``len(encoded_images) == 2 * len(issame)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verification file not found: {path}")
    with open(path, "rb") as f:
        try:
            obj = _RestrictedUnpickler(f, str(path)).load()
        except UnsafePickleError:
            raise
        except Exception as e:  # truncated / not a pickle
            raise ValueError(f"{path}: not a readable verification .bin ({e})") from e
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(f"{path}: expected a pickled (bins, issame_list) pair, got {type(obj).__name__}")
    bins, issame = obj
    bins = [bytes(b) if isinstance(b, (bytes, bytearray)) else b for b in bins]
    for i, b in enumerate(bins):
        if not isinstance(b, bytes):
            raise ValueError(f"{path}: image {i} is {type(b).__name__}, expected encoded bytes")
    issame = [bool(x) for x in issame]
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs (expected {2 * len(issame)})")
    return bins, issame


def write_bin(path: str | Path, encoded_images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write an insightface-compatible ``.bin`` atomically."""
    if len(encoded_images) != 2 * len(issame):
        raise ValueError(f"{len(encoded_images)} images for {len(issame)} pairs")
    payload = ([bytes(b) for b in encoded_images], [bool(x) for x in issame])
    with atomic_open(path, "wb") as f:
        pickle.dump(payload, f, protocol=4)
