"""``loss.head_init: imprint``: class centres from the pretrained backbone's embeddings.

For class c with training images i in I_c (file order; at most
``loss.imprint_max_per_class`` of them, the first ones):

    w_c = normalize( sum_{i in I_c} normalize(f(x_i)) )

with f the backbone in eval mode (running BatchNorm statistics, no dropout), x_i the
unflipped image normalised as in training. Classes without an image keep their random
initialisation (counted in the log). The head's momentum is untouched (zero at start).

One sharded pass, memory O(C/R . D) per rank: rank r embeds the selected images
r, r+R, r+2R, ... (in file order), each step's embeddings and labels are all-gathered
(a global batch, N x D), and every rank adds the rows of the classes it owns into its
[C_r, D] sum; no rank ever holds C x D. The sums do not depend on the world size, so
the centres are the same at any world size up to float rounding of the summation order.
"""
from __future__ import annotations

import logging
import math
import sys
from typing import Optional, Protocol, Sequence, Tuple, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.collectives import all_gather_rows, world_info
from trainer.data.model_input import to_model_input

log = logging.getLogger("trainer.imprint")


class ImageSource(Protocol):
    """What imprinting reads: every training image's label in file order, and images by index."""

    labels: np.ndarray

    def read(self, indices: np.ndarray) -> torch.Tensor:  # uint8 [n, H, W, 3] (or float NCHW)
        ...


class FaceRecImages:
    """:class:`ImageSource` over a face-rec dataset (decoded on the host, unflipped)."""

    def __init__(self, ds, size: Tuple[int, int] = (112, 112)) -> None:
        self.ds, self.size = ds, (int(size[0]), int(size[1]))
        self.labels = np.asarray(ds.scan())

    def read(self, indices: np.ndarray) -> torch.Tensor:
        from trainer.data.torch_loader import decode_image

        out = np.empty((len(indices), self.size[0], self.size[1], 3), np.uint8)
        for j, i in enumerate(indices):
            key = int(self.ds.image_keys[i])
            _, img = self.ds.read_image(key)
            decode_image(img, self.ds.reader.where(key), size=self.size, out=out[j])
        return torch.from_numpy(out)


def select_images(labels: np.ndarray, max_per_class: Optional[int]) -> np.ndarray:
    """Indices (file order) of the images used: all, or the first ``max_per_class`` of each class."""
    labels = np.asarray(labels).reshape(-1)
    if max_per_class is None:
        return np.arange(labels.size)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    ordinal = np.empty(labels.size, np.int64)
    ordinal[order] = np.arange(labels.size) - np.searchsorted(sorted_labels, sorted_labels, side="left")
    return np.flatnonzero(ordinal < max_per_class)


@torch.no_grad()
def imprint_centres(backbone: nn.Module, source: ImageSource, class_range: Tuple[int, int], dim: int,
                    device: torch.device, batch_size: int = 256, max_per_class: Optional[int] = None,
                    progress: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(centres [C_r, D] float32, image counts [C_r]) of the classes ``class_range`` owned by
    this rank. Collective over the default process group when one is initialised: every
    rank runs the same number of steps (the selection is computed identically everywhere,
    so each rank knows every rank's row count without asking)."""
    rank, world = world_info()
    lo, hi = class_range
    all_labels = np.asarray(source.labels).reshape(-1)
    sel = select_images(all_labels, max_per_class)
    shares = [sel[q::world] for q in range(world)]
    steps = math.ceil(shares[0].size / batch_size) if sel.size else 0  # rank 0 has the largest share
    was_training = backbone.training
    backbone.eval()
    sums = torch.zeros(hi - lo, dim, dtype=torch.float32, device=device)
    counts = torch.zeros(hi - lo, dtype=torch.int64, device=device)
    show = progress if progress is not None else (rank == 0 and sys.stderr.isatty())
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=int(sel.size), desc="imprint", unit="img")
    try:
        for s in range(steps):
            cut = slice(s * batch_size, (s + 1) * batch_size)
            sizes = [int(share[cut].size) for share in shares]
            idx = shares[rank][cut]
            labels = torch.as_tensor(all_labels[idx], dtype=torch.int64, device=device)
            if idx.size:
                emb = F.normalize(backbone(to_model_input(source.read(idx).to(device))).float(), dim=1)
            else:  # this rank's share ended: take part in the gather with no rows
                emb = torch.zeros(0, dim, device=device)
            glob_emb = all_gather_rows(emb, sizes)
            glob_lab = all_gather_rows(labels, sizes)
            own = (glob_lab >= lo) & (glob_lab < hi)
            rows = glob_lab[own] - lo
            sums.index_add_(0, rows, glob_emb[own])
            counts.index_add_(0, rows, torch.ones_like(rows))
            if bar is not None:
                bar.update(sum(sizes))
    finally:
        backbone.train(was_training)
        if bar is not None:
            bar.close()
    return F.normalize(sums, dim=1), counts


def imprint_head(head: nn.Module, backbone: nn.Module, source: ImageSource, device: torch.device,
                 batch_size: int = 256, max_per_class: Optional[int] = None) -> int:
    """Write the imprinted centres into ``head.weight`` (this rank's shard, any dtype) for the
    classes with at least one image; returns how many classes had none (kept random)."""
    w = cast(torch.Tensor, head.weight)
    start, stop = cast(Tuple[int, int], tuple(cast(Sequence[int], head.class_range)))
    centres, counts = imprint_centres(backbone, source, (start, stop), int(w.shape[1]), device, batch_size,
                                      max_per_class)
    have = counts > 0
    with torch.no_grad():
        w.copy_(torch.where(have[:, None], centres.to(w.device), w.float()).to(w.dtype))
    empty = int((~have).sum())
    return empty
