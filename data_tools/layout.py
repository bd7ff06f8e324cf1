"""Write a dataset in insightface's RecordIO layout (docs/design.md §3).

key 0           header, flag 2, labels (N+1, N+1+K)
keys 1..N       images, grouped by label (flag 0, scalar label)
keys N+1..N+K   identity records: labels (first, end) image keys of identity k
property        "K,112,112"

The physical order of the image records can be shuffled (keys stay grouped by
identity) so that a local shuffle buffer mixes identities. All files are
written atomically.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Tuple, Union

import numpy as np

from trainer.data.face_rec import write_property
from trainer.data.irheader import IRHeader, check_label_exact, pack
from trainer.data.recordio import IndexedRecordWriter

PathLike = Union[str, os.PathLike]


def plan_layout(labels: Union[Sequence[int], np.ndarray], num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """Stable order of images grouped by label, and [first, end) key ranges per class.

    Returns ``(order, ranges)``: ``order[j]`` = index into ``labels`` of image key ``j+1``;
    ``ranges[c] = (first_key, end_key)`` (empty range where a class has no image).
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    for c in (0, num_classes - 1, labels.size + num_classes):  # header keys are float32 too
        check_label_exact(c)
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=num_classes)
    ends = 1 + np.cumsum(counts)
    ranges = np.stack([ends - counts, ends], axis=1)
    return order, ranges


def write_face_rec(
    out_dir: PathLike,
    labels: Union[Sequence[int], np.ndarray],
    num_classes: int,
    payloads: Callable[[Sequence[int]], Iterable[bytes]],
    shuffle_seed: Optional[int] = None,
    progress: Optional[str] = None,
    image_size: Tuple[int, int] = (112, 112),
) -> dict:
    """Write train.rec/train.idx/property in insightface layout.

    ``labels[i]`` is the class of source image i; ``payloads(indices)`` yields
    the encoded images of the given source indices in that order (it may run in
    parallel internally). ``shuffle_seed`` shuffles the physical order of image
    records. Returns a summary dict.
    """
    out_dir = Path(out_dir)
    labels = np.asarray(labels, dtype=np.int64)
    n = int(labels.size)
    order, ranges = plan_layout(labels, num_classes)
    # physical write order, as positions into `order` (image key = pos + 1)
    phys = np.arange(n)
    if shuffle_seed is not None:
        phys = np.random.default_rng(shuffle_seed).permutation(n)
    src = order[phys]
    it: Iterable[bytes] = iter(payloads(src.tolist()))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=n, desc=progress, unit="img")
    nbytes = 0
    with IndexedRecordWriter(out_dir / "train.rec", out_dir / "train.idx") as w:
        w.write(0, pack(IRHeader(2, np.array([n + 1, n + 1 + num_classes], np.float32))))
        for pos, img in zip(phys.tolist(), it):
            if not img:
                raise ValueError(f"empty image for source index {int(order[pos])}")
            lab = int(labels[order[pos]])
            w.write(pos + 1, pack(IRHeader(0, float(lab)), img))
            nbytes += len(img)
        count = len(w._index) - 1
        if count != n:
            raise RuntimeError(f"payload source produced {count} images, expected {n}")
        for c in range(num_classes):
            a, b = ranges[c]
            w.write(n + 1 + c, pack(IRHeader(2, np.array([a, b], np.float32))))
    write_property(out_dir, num_classes, *image_size)
    return {"images": n, "identities": num_classes, "image_bytes": nbytes}
