"""torch ``DataLoader`` fallback over the pure-Python RecordIO reader.

The main process computes this rank's epoch plan (:class:`trainer.data.plan.RankPlan`,
O(images per rank)); with the block shuffle it mixes the stream through a
shuffle window (:func:`trainer.data.plan.window_shuffle`, ``shuffle_buffer``
images). The sampler hands each worker a batch's image indices and flips.
Workers (``num_threads`` processes) each read a whole batch with positional
reads in byte order, decode with simplejpeg (libjpeg-turbo; Pillow for non-JPEG)
straight into the batch buffer, flip, and return uint8 NHWC (pinned memory on
CUDA); the main process copies it to the device (``non_blocking``), as the DALI
pipeline delivers it. Cast and normalisation happen once, on the training
device, in the step (:func:`trainer.data.model_input.to_model_input`).
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

import trainer.data.plan as plan
from trainer.data.augment import AugmentConfig, apply_numpy
from trainer.data.face_rec import FaceRecDataset, warn_if_identity_sorted
from trainer.data.loader_base import FaceLoaderBase
from trainer.data.recordio import RecordIOError
from trainer.io.images import ImageDecodeError, decode_rgb, is_jpeg
from trainer.runtime.preemption import own_process_group


def decode_image(data: bytes, where: str, size: Tuple[int, int] = (112, 112),
                 out: Optional[np.ndarray] = None) -> np.ndarray:
    """:func:`trainer.io.images.decode_rgb` (strict, of ``size``); errors are RecordIOError naming the record."""
    try:
        return decode_rgb(data, where, size=size, out=out)
    except ImageDecodeError as e:
        raise RecordIOError(str(e)) from None


class _EpochBatches(Dataset):
    """Item ``(epoch, b, image indices [B], flips [B])`` -> (images, int64 labels).

    The plan travels with the item (computed once per epoch in the main
    process), so DataLoader workers persist across epochs and hold no plan.
    """

    def __init__(self, ds: FaceRecDataset, offsets: np.ndarray, seed: int,
                 augment: Optional[AugmentConfig], size: Tuple[int, int]):
        self.ds, self.offsets = ds, offsets
        self.seed, self.augment = seed, augment
        self.size = size

    def __getitem__(self, item: Tuple[int, int, np.ndarray, np.ndarray]):
        epoch, b, idx, fl = item
        out = np.empty((len(idx), self.size[0], self.size[1], 3), np.uint8)
        labels = np.empty(len(idx), np.int64)
        keys = self.ds.image_keys
        rng = None
        aug = self.augment
        if aug is not None and aug.active():
            rng = np.random.default_rng([self.seed, epoch, b, 0xA06])
        # read in byte order (sequential within a block); augment draws stay in batch order
        order = np.argsort(self.offsets[idx], kind="stable")
        raw: Dict[int, Tuple[int, int, bytes]] = {}
        for j in order.tolist():
            key = int(keys[idx[j]])
            raw[j] = (key, *self.ds.read_image(key))
        for j in range(len(idx)):
            key, lab, data = raw[j]
            if rng is None and is_jpeg(data):
                decode_image(data, self.ds.reader.where(key), self.size, out=out[j])
            else:
                img = decode_image(data, self.ds.reader.where(key), self.size)
                if rng is not None and aug is not None:
                    img = apply_numpy(img, aug, rng)
                out[j] = img
            labels[j] = lab
        if fl.any():
            out[fl] = out[fl, :, ::-1]
        imgs = torch.from_numpy(out)
        return imgs, torch.from_numpy(labels)


class _EpochSampler(Sampler):
    """Yields ``(epoch, batch, indices, flips)`` from ``start``; plan set by the loader."""

    def __init__(self, num_batches: int):
        self.n, self.epoch, self.start = num_batches, 0, 0
        # set for each epoch by the loader before it iterates
        self.batches: Optional[np.ndarray] = None
        self.flips: Optional[np.ndarray] = None

    def __iter__(self):
        batches, flips = self.batches, self.flips
        assert batches is not None and flips is not None, "the loader sets the epoch's plan first"
        for b in range(self.start, self.n):
            yield (self.epoch, b, batches[b], flips[b])

    def __len__(self) -> int:
        return self.n - self.start


class TorchFaceLoader(FaceLoaderBase):
    """Same interface as the DALI loader (see ``trainer.data.build_train_loader``)."""

    backend = "torch"

    def __init__(self, ds: FaceRecDataset, batch_size: int, rank: int, world_size: int,
                 device: torch.device, num_threads: int = 2, seed: int = 0,
                 augment: Optional[AugmentConfig] = None, shuffle: bool = True, flip: bool = True,
                 image_size: Tuple[int, int] = (112, 112), shuffle_mode: str = "block",
                 block_bytes: Optional[int] = None, shuffle_buffer: Optional[int] = None):
        super().__init__(ds, batch_size, rank, world_size, device, num_threads, seed, augment,
                         shuffle, flip, image_size, shuffle_mode, block_bytes, shuffle_buffer)
        if shuffle and shuffle_mode == "block":
            warn_if_identity_sorted(ds, batch_size, self.shuffle_buffer)
        self._set = _EpochBatches(ds, ds.image_offsets, seed, augment, self.image_size)
        self._sampler = _EpochSampler(self._len)
        self._dl: Optional[DataLoader] = None
        self._plan_epoch: Optional[Tuple[int, tuple]] = None  # (epoch, segments) of the cached plan

    def consumed(self, share: np.ndarray, epoch: int, rank: int, segment: int, world_size: int,
                 batch_size: int, batches: int) -> np.ndarray:
        return self.consumption_order(share, epoch, rank, segment)[:batches * batch_size]

    def consumption_order(self, share: np.ndarray, epoch: int, rank: int, segment: int) -> np.ndarray:
        """The shuffle window over ``share`` (block shuffle); the stream order otherwise.
        Segment 0 draws what the loader always drew; segment k > 0 draws with k in the seed."""
        if not (self.shuffle and self.shuffle_mode == "block"):
            return share
        key = [self.seed, epoch, rank, 0xB0FF] if segment == 0 else [self.seed, epoch, rank, segment, 0xB0FF]
        window = self.buffer_for(share.size)
        return plan.window_shuffle(share, window, np.random.default_rng(key))

    def epoch_plan(self, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        """(image indices [len, B], flips [len, B]) of this rank in ``epoch``'s current segment;
        O(images per rank) (O(N) once after a mid-epoch change, trainer.data.plan)."""
        key = (epoch, self.segments)
        if self._plan_epoch != key:
            share, k = self.segment(epoch)
            pos = self.consumption_order(share, epoch, self.rank, k)
            fl = plan.rank_flips(self.seed, epoch, self.rank, share.size, k)
            if not self.flip:
                fl[:] = False
            n = share.size // self.batch_size
            self._plan = (pos.reshape(n, self.batch_size), fl.reshape(n, self.batch_size))
            self._plan_epoch = key
        return self._plan

    def rank_indices(self, epoch: int) -> np.ndarray:
        """Image indices (into ``ds.image_keys``) this rank reads in ``epoch``, in order."""
        return self.epoch_plan(epoch)[0].reshape(-1)

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
        self._sampler.batches, self._sampler.flips = self.epoch_plan(self.epoch)
        self._sampler.epoch, self._sampler.start = self.epoch, self.start_batch
        self._sampler.n = len(self._sampler.batches)
        self.start_batch = 0  # a resume offset applies to one pass only
        for imgs, labels in self._loader():
            yield imgs.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
