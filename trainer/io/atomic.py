"""Atomic file writes: a crash leaves the previous file intact.

Write to a temporary file in the destination folder, fsync, then ``os.replace``
(atomic on POSIX within one file system).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator, Union

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; rename it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    if "w" not in mode:
        raise ValueError(f"atomic_open is for writing, got mode {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: object, path: PathLike) -> None:
    """``torch.save`` through :func:`atomic_open`."""
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
