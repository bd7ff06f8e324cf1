"""Which images each rank sees in an epoch; shared by the DALI and torch loaders.

Contract (trainer): ``len(loader) = (num_images // world_size) // batch_size``
on every rank; the epoch's order is a pure function of (seed, epoch); the
partial tail is dropped.

* shuffle: a permutation of all images drawn from (seed, epoch); its first
  ``world_size * len * batch_size`` entries are used, rank r takes the r-th
  contiguous chunk. Every used image appears exactly once across ranks.
* no shuffle: images in physical (byte offset) order, contiguous chunks: this
  is also what DALI's reader does with ``random_shuffle=False``, so both
  backends give the same sequence.
"""
from __future__ import annotations

import numpy as np


def batches_per_rank(num_images: int, world_size: int, batch_size: int) -> int:
    return (num_images // world_size) // batch_size


def epoch_selection(offsets: np.ndarray, seed: int, epoch: int, used: int, shuffle: bool) -> np.ndarray:
    """Indices (into the image list) of the ``used`` images of this epoch, in global order."""
    n = offsets.size
    if shuffle:
        return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)[:used]
    return np.argsort(offsets, kind="stable")[:used]


def rank_chunk(selection: np.ndarray, rank: int, per_rank: int) -> np.ndarray:
    return selection[rank * per_rank:(rank + 1) * per_rank]


def flips(seed: int, epoch: int, n: int) -> np.ndarray:
    """Deterministic horizontal-flip decisions for the torch loader."""
    return np.random.default_rng([seed, epoch, 0xF11F]).random(n) < 0.5
