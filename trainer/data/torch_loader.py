"""torch ``DataLoader`` fallback over the pure-Python RecordIO reader.

Workers (``num_threads`` processes) each read a whole batch with positional
reads, decode with simplejpeg (libjpeg-turbo; Pillow for non-JPEG), flip, and
return uint8 NHWC; the main process moves it to the device and normalises
there (``(x - 127.5) / 127.5``, CHW), as the DALI pipeline does. On a CPU
device the workers normalise (in shared memory), so the main process only
receives finished batches.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from trainer.data import plan
from trainer.data.augment import AugmentConfig, apply_numpy
from trainer.data.face_rec import FaceRecDataset
from trainer.data.loader_base import FaceLoaderBase
from trainer.data.recordio import RecordIOError
from trainer.io.images import ImageDecodeError, decode_rgb, is_jpeg
from trainer.preemption import own_process_group


def decode_image(data: bytes, where: str, size: Tuple[int, int] = (112, 112),
                 out: Optional[np.ndarray] = None) -> np.ndarray:
    """:func:`trainer.io.images.decode_rgb` (strict, of ``size``); errors are RecordIOError naming the record."""
    try:
        return decode_rgb(data, where, size=size, out=out)
    except ImageDecodeError as e:
        raise RecordIOError(str(e)) from None


def normalize_nhwc(imgs: torch.Tensor, shared: bool = False) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [-1, 1]: ``(x - 127.5) / 127.5``, one strided copy + two in-place ops.

    ``shared``: allocate in shared memory (inside a DataLoader worker this saves
    the copy torch makes when sending the batch to the main process).
    """
    n, h, w, c = imgs.shape
    out = torch.empty((n, c, h, w), dtype=torch.float32, device=imgs.device)
    if shared:
        out.share_memory_()
    out.copy_(imgs.permute(0, 3, 1, 2))
    return out.sub_(127.5).div_(127.5)


class _EpochBatches(Dataset):
    """Item ``(epoch, b)`` = batch b of this rank in that epoch: (images, int64 labels).

    The epoch's plan is computed (and cached) inside whichever process serves
    the item, so DataLoader workers can persist across epochs.
    """

    def __init__(self, ds: FaceRecDataset, offsets: np.ndarray, batch_size: int, num_batches: int,
                 rank: int, world_size: int, seed: int, shuffle: bool, flip: bool,
                 augment: Optional[AugmentConfig], size: Tuple[int, int], normalize: bool):
        self.ds, self.offsets = ds, offsets
        self.B, self.L, self.rank, self.W = batch_size, num_batches, rank, world_size
        self.seed, self.shuffle, self.flip, self.augment = seed, shuffle, flip, augment
        self.size, self.normalize = size, normalize
        self._plan_epoch: Optional[int] = None

    def __len__(self) -> int:
        return self.L

    def plan(self, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        """(image indices [L, B], flips [L, B]) of this rank in ``epoch``."""
        if self._plan_epoch != epoch:
            per_rank = self.L * self.B
            sel = plan.epoch_selection(self.offsets, self.seed, epoch, per_rank * self.W, self.shuffle)
            mine = plan.rank_chunk(sel, self.rank, per_rank).reshape(self.L, self.B)
            fl = plan.flips(self.seed, epoch, per_rank * self.W)
            fl = plan.rank_chunk(fl, self.rank, per_rank).reshape(self.L, self.B)
            if not self.flip:
                fl = np.zeros_like(fl)
            self._plan, self._plan_epoch = (mine, fl), epoch
        return self._plan

    def __getitem__(self, item: Tuple[int, int]):
        epoch, b = item
        batches, flips = self.plan(epoch)
        idx, fl = batches[b], flips[b]
        out = np.empty((len(idx), self.size[0], self.size[1], 3), np.uint8)
        labels = np.empty(len(idx), np.int64)
        keys = self.ds.image_keys
        rng = None
        if self.augment is not None and self.augment.active():
            rng = np.random.default_rng([self.seed, epoch, b, 0xA06])
        for j, i in enumerate(idx):
            key = int(keys[i])
            lab, data = self.ds.read_image(key)
            if rng is None and is_jpeg(data):
                decode_image(data, self.ds.reader.where(key), self.size, out=out[j])
            else:
                img = decode_image(data, self.ds.reader.where(key), self.size)
                if rng is not None:
                    img = apply_numpy(img, self.augment, rng)
                out[j] = img
            labels[j] = lab
        if fl.any():
            out[fl] = out[fl, :, ::-1]
        imgs = torch.from_numpy(out)
        if self.normalize:
            imgs = normalize_nhwc(imgs, shared=torch.utils.data.get_worker_info() is not None)
        return imgs, torch.from_numpy(labels)


class _EpochSampler(Sampler):
    """Yields ``(epoch, batch)`` for the current epoch from ``start``; state set by the loader."""

    def __init__(self, num_batches: int):
        self.n, self.epoch, self.start = num_batches, 0, 0

    def __iter__(self):
        return iter([(self.epoch, b) for b in range(self.start, self.n)])

    def __len__(self) -> int:
        return self.n - self.start


class TorchFaceLoader(FaceLoaderBase):
    """Same interface as the DALI loader (see ``trainer.data.build_train_loader``)."""

    backend = "torch"

    def __init__(self, ds: FaceRecDataset, batch_size: int, rank: int, world_size: int,
                 device: torch.device, num_threads: int = 2, seed: int = 0,
                 augment: Optional[AugmentConfig] = None, shuffle: bool = True, flip: bool = True,
                 image_size: Tuple[int, int] = (112, 112)):
        super().__init__(ds, batch_size, rank, world_size, device, num_threads, seed, augment,
                         shuffle, flip, image_size)
        offsets = np.asarray([ds.reader.offsets[int(k)] for k in ds.image_keys], np.int64)
        # CPU: normalise where the decoding happens (in parallel workers); CUDA: ship uint8, normalise on GPU
        self._on_host = self.device.type == "cpu"
        self._set = _EpochBatches(ds, offsets, batch_size, self._len, rank, world_size, seed, shuffle,
                                  flip, augment, self.image_size, normalize=self._on_host)
        self._sampler = _EpochSampler(self._len)
        self._dl: Optional[DataLoader] = None

    def rank_indices(self, epoch: int) -> np.ndarray:
        """Image indices (into ``ds.image_keys``) this rank reads in ``epoch``, in order."""
        return self._set.plan(epoch)[0].reshape(-1)

    def _loader(self) -> DataLoader:
        if self._dl is None:
            workers = max(0, int(self.num_threads))
            self._dl = DataLoader(
                self._set, batch_size=None, sampler=self._sampler, num_workers=workers,
                prefetch_factor=4 if workers else None, persistent_workers=workers > 0,
                pin_memory=self.device.type == "cuda",
                worker_init_fn=own_process_group,  # torchrun's SIGTERM to the group: the trainer saves first
            )
        return self._dl

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        self._sampler.epoch, self._sampler.start = self.epoch, self.start_batch
        self.start_batch = 0  # a resume offset applies to one pass only
        for imgs, labels in self._loader():
            if not self._on_host:
                imgs = normalize_nhwc(imgs.to(self.device, non_blocking=True))
            yield imgs, labels.to(self.device, non_blocking=True)
