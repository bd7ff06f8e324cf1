"""Which images each rank sees in an epoch; shared by the DALI and torch loaders.

Contract (trainer): ``len(loader) = (num_images // world_size) // batch_size``
on every rank (``P = len * batch_size`` images per rank); every used image
appears exactly once per epoch across ranks; the epoch's order is a pure
function of (seed, epoch); the tail is dropped.

Every rank computes **only its own share**, in O(P) memory and time (plus
O(N / block) for the block permutation): numpy arrays, no Python object per
image. Three selections (``mode``):

* ``"block"`` (default with ``shuffle=True``): the images in physical (byte
  offset) order are cut into blocks of ``block_images`` consecutive records
  (a few MB of file, :func:`block_images_for`). A permutation of the blocks is
  drawn from (seed, epoch); the blocks laid end to end in that order form the
  epoch's stream, rank r takes stream positions ``[r P, (r + 1) P)``. Each block
  is read in file order, so reads are sequential within a block; the loaders
  mix through a shuffle buffer (DALI ``initial_fill``; :func:`window_shuffle`
  for the torch loader). The dropped tail is the end of the last permuted
  blocks, so it changes every epoch.
* ``"global"``: a permutation of all N images from (seed, epoch); rank r takes
  the r-th contiguous chunk of its first ``R P`` entries (the pre-block
  behaviour; random reads across the whole file). O(N) memory per rank
  (8 bytes per image).
* no shuffle: images in physical order, contiguous chunks: also what DALI's
  reader does with ``random_shuffle=False``, so both backends give the same
  sequence.

**Segments (a world size or per-rank batch change mid-epoch).** The epoch's
stream ``S`` (all N images, the order above) is a function of (seed, epoch)
only. A part of an epoch run at world size ``W`` and per-rank batch ``B`` is a
*segment*; it works on the images still remaining, ``L_k`` (``L_0 = S``), in
stream order: ``P_k = ((|L_k| // W) // B) B``, rank r's share is
``L_k[r P_k, (r + 1) P_k)``, consumed in the loader's order (the torch
loader's shuffle window; DALI's reader buffer) one batch of B at a time. When
segment k stops after ``b_k`` batches (a checkpoint, then a restart at another
size), its consumed images ``C_k`` = the first ``b_k B`` of every rank's
share in consumption order, and ``L_{k+1}`` = ``L_k`` minus ``C_k`` in stream order.
Hence every image of the epoch is consumed at most once, and none is skipped
but the last segment's dropped tail (fewer than ``W B`` plus the rounding).
The finished segments of the current epoch are recorded in the checkpoint
(``(W, B, b)`` each, :class:`Segment`); recomputing ``L_k`` at a resume costs
O(N) memory and time once (8 bytes per image), the steady state stays O(P).
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Sequence

import numpy as np

from trainer.data.config import SHUFFLE_MODES as MODES  # data.shuffle_mode choices

#: default block size of the block shuffle, in bytes of file.
DEFAULT_BLOCK_BYTES = 4 << 20


def batches_per_rank(num_images: int, world_size: int, batch_size: int) -> int:
    return (num_images // world_size) // batch_size


class Segment(NamedTuple):
    """A finished part of an epoch: ``batches`` batches of ``batch_size`` on each of ``world_size`` ranks."""
    world_size: int
    batch_size: int
    batches: int


def coerce_segments(segments: Sequence) -> tuple:
    out = tuple(Segment(*(int(v) for v in s)) for s in segments or ())
    for s in out:
        if s.world_size < 1 or s.batch_size < 1 or s.batches < 0:
            raise ValueError(f"epoch segment {tuple(s)}: world size and batch size must be >= 1, batches >= 0")
    return out


#: ``consumed(share, epoch, rank, segment_index, world_size, batch_size, batches)`` -> the first
#: ``batches x batch_size`` image indices of ``share`` in the order the loader consumed them
Consumed = Callable[[np.ndarray, int, int, int, int, int, int], np.ndarray]


def remaining_stream(stream: np.ndarray, segments: Sequence[Segment], epoch: int,
                     consumed: Consumed) -> np.ndarray:
    """``L_k``: the images of ``stream`` (the epoch's order) that ``segments`` left, in stream order.

    Raises ValueError when a segment claims more batches than its share holds.
    """
    remaining = np.asarray(stream, dtype=np.int64)
    for k, s in enumerate(coerce_segments(segments)):
        if s.batches == 0:
            continue
        per = batches_per_rank(remaining.size, s.world_size, s.batch_size) * s.batch_size
        take = s.batches * s.batch_size
        if take > per:
            raise ValueError(f"epoch {epoch} segment {k} ({s.world_size} ranks x batch {s.batch_size}): "
                             f"{s.batches} batches consumed but the share holds {per // s.batch_size}")
        gone = np.zeros(int(remaining.max(initial=-1)) + 1, dtype=bool)
        for r in range(s.world_size):
            share = remaining[r * per:(r + 1) * per]
            used = np.asarray(consumed(share, epoch, r, k, s.world_size, s.batch_size, s.batches))
            if used.size != take:
                raise ValueError(f"epoch {epoch} segment {k} rank {r}: the loader replayed {used.size} of "
                                 f"{take} images")
            gone[used] = True
        remaining = remaining[~gone[remaining]]
    return remaining


def epoch_selection(offsets: np.ndarray, seed: int, epoch: int, used: int, shuffle: bool) -> np.ndarray:
    """Indices of the ``used`` images of this epoch, in global order (the whole-epoch, O(N) form).

    Kept for ``mode="global"`` (whose rank shares are chunks of it) and for
    bench/data_scale.py's comparison with the former whole-index loaders.
    """
    n = offsets.size
    if shuffle:
        return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)[:used]
    return np.argsort(offsets, kind="stable")[:used]


def rank_chunk(selection: np.ndarray, rank: int, per_rank: int) -> np.ndarray:
    return selection[rank * per_rank:(rank + 1) * per_rank]


def flips(seed: int, epoch: int, n: int) -> np.ndarray:
    """Deterministic horizontal-flip decisions (whole epoch, global form)."""
    return np.random.default_rng([seed, epoch, 0xF11F]).random(n) < 0.5


def rank_flips(seed: int, epoch: int, rank: int, n: int, segment: int = 0) -> np.ndarray:
    """Flip decisions for the ``n`` images of ``rank`` in ``epoch`` (torch loader); segment
    k > 0 of an epoch (a world-size change, :class:`Segment`) draws with k in the seed."""
    key = [seed, epoch, rank, 0xF11F] if segment == 0 else [seed, epoch, rank, segment, 0xF11F]
    return np.random.default_rng(key).random(n) < 0.5


def physical_order(offsets: np.ndarray) -> np.ndarray:
    """Image indices sorted by byte offset (int32 when it fits); ``arange`` when already sorted."""
    n = offsets.size
    dt = np.int32 if n < 2**31 else np.int64
    if n < 2 or bool(np.all(offsets[1:] > offsets[:-1])):
        return np.arange(n, dtype=dt)
    return np.argsort(offsets, kind="stable").astype(dt, copy=False)


def block_images_for(offsets: np.ndarray, file_size: int, block_bytes: int) -> int:
    """Records per block so that a block spans about ``block_bytes`` of file (mean record size)."""
    if block_bytes <= 0:
        raise ValueError(f"block_bytes must be > 0, got {block_bytes}")
    n = max(1, offsets.size)
    mean = max(1.0, file_size / n)
    return max(1, int(block_bytes // mean))


class RankPlan:
    """Per-rank epoch selection over images whose byte offsets are ``offsets``.

    ``rank_positions(epoch)`` gives this rank's ``per_rank`` image indices in
    the order the stream delivers them (before any shuffle buffer).
    """

    def __init__(self, offsets: np.ndarray, rank: int, world_size: int, per_rank: int, seed: int,
                 shuffle: bool, mode: str = "block", block_images: int = 1024,
                 order: Optional[np.ndarray] = None):
        if mode not in MODES:
            raise ValueError(f"shuffle mode must be one of {MODES}, got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if per_rank * world_size > offsets.size:
            raise ValueError(f"{world_size} ranks x {per_rank} images exceed the {offsets.size} images")
        if block_images < 1:
            raise ValueError(f"block_images must be >= 1, got {block_images}")
        self.offsets = offsets
        self.n = int(offsets.size)
        self.rank, self.world_size, self.per_rank = rank, world_size, per_rank
        self.seed, self.shuffle, self.mode, self.block_images = seed, shuffle, mode, int(block_images)
        # physical order is needed by "block" and no-shuffle; "global" never touches it.
        # None = the identity (offsets already increasing: the usual case), saving 4 bytes per image.
        self.order = order
        if order is None and (mode == "block" or not shuffle):
            if not (self.n < 2 or bool(np.all(offsets[1:] > offsets[:-1]))):
                self.order = physical_order(offsets)

    def _phys(self, positions: np.ndarray) -> np.ndarray:
        """Image indices at physical (byte-order) ``positions``, int64."""
        if self.order is None:
            return positions.astype(np.int64, copy=False)
        return self.order[positions].astype(np.int64, copy=False)

    def num_blocks(self) -> int:
        return -(-self.n // self.block_images)

    def block_permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, 0xB10C]).permutation(self.num_blocks())

    def stream(self, epoch: int, lo: int = 0, hi: Optional[int] = None) -> np.ndarray:
        """Image indices at stream positions [lo, hi) of ``epoch`` (default: the whole epoch's
        stream ``S``, all N images, O(N)), int64."""
        hi = self.n if hi is None else hi
        if not self.shuffle:
            return self._phys(np.arange(lo, hi, dtype=np.int64))
        if self.mode == "global":
            # the same permutation as the former whole-epoch selection (O(N) per call)
            perm = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(self.n)
            return perm[lo:hi].astype(np.int64, copy=False)
        return self._phys(self.stream_physical(epoch, lo, hi))

    def rank_positions(self, epoch: int) -> np.ndarray:
        """Image indices (into the image list) of this rank in ``epoch``, stream order (int64)."""
        return self.stream(epoch, self.rank * self.per_rank, (self.rank + 1) * self.per_rank)

    def stream_physical(self, epoch: int, lo: int, hi: int) -> np.ndarray:
        """Physical positions (indices into ``order``) of stream positions [lo, hi) of ``epoch``."""
        K, n = self.block_images, self.n
        perm = self.block_permutation(epoch)
        sizes = np.minimum(K, n - perm.astype(np.int64) * K)
        ends = np.cumsum(sizes)
        starts = ends - sizes
        first = int(np.searchsorted(ends, lo, side="right"))
        last = int(np.searchsorted(starts, hi, side="left"))  # blocks [first, last) overlap [lo, hi)
        seg_stream_lo = np.maximum(starts[first:last], lo)
        seg_stream_hi = np.minimum(ends[first:last], hi)
        seg_phys_lo = perm[first:last].astype(np.int64) * K + (seg_stream_lo - starts[first:last])
        lens = seg_stream_hi - seg_stream_lo
        # positions = phys_lo of the segment + offset inside the segment, without a Python loop
        seg_of = np.repeat(np.arange(lens.size), lens)
        within = np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
        return seg_phys_lo[seg_of] + within


def window_shuffle(x: np.ndarray, window: int, rng: np.random.Generator) -> np.ndarray:
    """Permute ``x`` within consecutive windows of ``window`` entries (vectorised shuffle buffer).

    A torch-loader stand-in for DALI's ``initial_fill`` buffer: an image moves
    at most ``window - 1`` places, so a batch mixes ~``window`` consecutive
    stream images (several blocks).
    """
    n = x.size
    if window <= 1 or n <= 1:
        return x.copy()
    full = (n // window) * window
    out = np.empty_like(x)
    if full:
        out[:full] = rng.permuted(x[:full].reshape(-1, window), axis=1).reshape(-1)
    if full < n:
        out[full:] = rng.permutation(x[full:])
    return out


# --------------------------------------------------------------------------- measurements
def batch_mixing(labels_in_order: np.ndarray, batch_size: int) -> Dict[str, float]:
    """Identity diversity of consecutive batches of ``labels_in_order``.

    ``identities_per_batch``: mean number of distinct labels in a batch;
    ``repeat_fraction``: mean fraction of a batch's images whose label already
    occurred earlier in that batch.
    """
    nb = labels_in_order.size // batch_size
    if nb == 0:
        return {"identities_per_batch": 0.0, "repeat_fraction": 0.0, "batches": 0}
    b = np.sort(labels_in_order[:nb * batch_size].reshape(nb, batch_size), axis=1)
    distinct = 1 + np.count_nonzero(b[:, 1:] != b[:, :-1], axis=1)
    return {"identities_per_batch": float(distinct.mean()),
            "repeat_fraction": float(1.0 - distinct.mean() / batch_size), "batches": int(nb)}


def read_pattern(read_offsets: np.ndarray, read_sizes: np.ndarray, block_of: Optional[np.ndarray] = None
                 ) -> Dict[str, float]:
    """Statistics of a sequence of reads (byte offset, size) in the order they are issued.

    ``increasing``: fraction of reads at a higher offset than the previous read;
    ``increasing_in_block``: the same over consecutive reads in the same block
    (``block_of``, when given); ``bytes_per_seek``: bytes read per
    discontinuity (a read not starting where the previous one ended).
    """
    off = np.asarray(read_offsets, np.int64)
    size = np.asarray(read_sizes, np.int64)
    if off.size < 2:
        return {"reads": int(off.size), "increasing": 1.0, "increasing_in_block": 1.0,
                "bytes_per_seek": float(size.sum())}
    inc = off[1:] > off[:-1]
    seeks = 1 + int(np.count_nonzero(off[1:] != off[:-1] + size[:-1]))
    out = {"reads": int(off.size), "increasing": float(inc.mean()), "bytes_per_seek": float(size.sum() / seeks)}
    if block_of is not None:
        same = block_of[1:] == block_of[:-1]
        out["increasing_in_block"] = float(inc[same].mean()) if same.any() else 1.0
    return out
