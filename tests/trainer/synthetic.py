"""Tiny in-memory identity dataset + loader with trainer.data's interface (for fast tests).

Each identity is a random 3x6x6 pattern upsampled to 112x112; its images add
noise, a brightness change and a small shift. Held-out identities make a
verification .bin (written with trainer.io.binfile.write_bin).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from trainer.io.binfile import write_bin


def _identity_images(protos: torch.Tensor, per_id: int, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    n_id = len(protos)
    labels = torch.arange(n_id).repeat_interleave(per_id)
    base = F.interpolate(protos, size=(112, 112), mode="bilinear", align_corners=False)[labels]
    x = base + 0.35 * torch.randn(base.shape, generator=gen)
    x = x + 0.3 * (torch.rand(len(x), 1, 1, 1, generator=gen) - 0.5)
    shifts = torch.randint(-6, 7, (len(x), 2), generator=gen)
    x = torch.stack([torch.roll(xi, (int(s[0]), int(s[1])), (1, 2)) for xi, s in zip(x, shifts)])
    return x.clamp(-1, 1), labels


def make_dataset(identities: int = 32, per_id: int = 8, val_identities: int = 16, val_pairs: int = 100,
                 seed: int = 0, bin_path: Optional[Path] = None):
    """Returns (train images float [-1,1], labels); writes <bin_path> if given."""
    gen = torch.Generator().manual_seed(seed)
    protos = torch.rand(identities + val_identities, 3, 6, 6, generator=gen) * 2 - 1
    images, labels = _identity_images(protos[:identities], per_id, gen)
    if bin_path is not None:
        vimg, vlab = _identity_images(protos[identities:], 4, gen)
        from PIL import Image

        enc, issame = [], []
        rng = np.random.default_rng(seed)
        for k in range(val_pairs):
            same = k % 2 == 0
            a = int(rng.integers(len(vimg)))
            pool = np.where((vlab == vlab[a]).numpy() if same else (vlab != vlab[a]).numpy())[0]
            pool = pool[pool != a]
            b = int(rng.choice(pool))
            for i in (a, b):
                arr = ((vimg[i].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="PNG")
                enc.append(buf.getvalue())
            issame.append(same)
        write_bin(bin_path, enc, issame)
    return images, labels


class MemoryLoader:
    """Same interface as trainer.data's loader. The global batch b of an epoch is
    perm[b*B*R:(b+1)*B*R] and rank r takes its r-th slice, so R ranks x B see the
    same global batches as 1 rank x R*B."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, device=None, nan_at_batch: Optional[int] = None,
                 num_classes: Optional[int] = None):
        self.images, self.labels = images, labels
        self.B, self.rank, self.R, self.seed = batch_size, rank, world_size, seed
        self.device = device or torch.device("cpu")
        self.num_classes = num_classes or int(labels.max()) + 1
        self.num_images = len(images)
        self.nan_at_batch = nan_at_batch
        self.epoch, self.start, self.offset = 0, 0, 0
        self.served = 0

    def __len__(self) -> int:
        return self.num_images // (self.B * self.R)

    def set_epoch(self, epoch: int, start_batch: int = 0, segments=()) -> None:
        """``segments`` (trainer.data.plan.Segment): the epoch's parts at other sizes; the global
        order is one stream, so the next segment starts where they stopped."""
        self.epoch, self.start = epoch, start_batch
        self.offset = sum(w * b * n for w, b, n in segments)

    @property
    def imprint_source(self):
        """trainer.imprint.ImageSource over the images in their stored order (unflipped)."""
        return _MemorySource(self.images, self.labels, self.device)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        perm = torch.randperm(self.num_images, generator=g)
        G = self.B * self.R
        for b in range(self.start, (self.num_images - self.offset) // G):
            idx = perm[self.offset + b * G:self.offset + (b + 1) * G][self.rank * self.B:(self.rank + 1) * self.B]
            x = self.images[idx].clone()
            self.served += 1
            if self.nan_at_batch is not None and self.served == self.nan_at_batch:
                x[:] = float("nan")
            yield x.to(self.device), self.labels[idx].to(self.device)


class _MemorySource:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, device) -> None:
        self.images, self.device = images, device
        self.labels = labels.numpy()

    def read(self, indices) -> torch.Tensor:
        return self.images[torch.as_tensor(indices, dtype=torch.int64)].clone()
