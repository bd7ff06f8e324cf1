"""What the DALI and torch loaders share: dataset scan, epoch length, resume position,
the rank's epoch selection (:class:`trainer.data.plan.RankPlan`)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch

import trainer.data.plan as plan
from trainer.data.augment import AugmentConfig
from trainer.data.face_rec import FaceRecDataset

#: shuffle buffer (images) after the block shuffle: DALI ``initial_fill``, torch window.
DEFAULT_SHUFFLE_BUFFER = 8192


class FaceLoaderBase:
    """The loader contract (trainer.data.build_train_loader): ``len()`` batches per
    epoch, the same on every rank; ``set_epoch(epoch, start_batch)``."""

    def __init__(self, ds: FaceRecDataset, batch_size: int, rank: int, world_size: int,
                 device: torch.device, num_threads: int = 2, seed: int = 0,
                 augment: Optional[AugmentConfig] = None, shuffle: bool = True, flip: bool = True,
                 image_size: Tuple[int, int] = (112, 112), shuffle_mode: str = "block",
                 block_bytes: Optional[int] = None, shuffle_buffer: Optional[int] = None):
        self.ds = ds
        self.labels = ds.scan()  # validates every label / framing head up front
        self.num_classes = ds.num_classes
        self.num_images = ds.num_images
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.device = torch.device(device)
        self.num_threads, self.seed, self.shuffle, self.flip = num_threads, seed, shuffle, flip
        self.augment = augment
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self._len = plan.batches_per_rank(self.num_images, world_size, batch_size)
        if self._len == 0:
            raise ValueError(
                f"{ds.rec_path}: {self.num_images} images cannot fill one batch of {batch_size} "
                f"on each of {world_size} ranks"
            )
        self.epoch, self.start_batch = 0, 0
        self.per_rank = self._len * batch_size
        self.shuffle_mode = shuffle_mode
        self.block_bytes = int(block_bytes or plan.DEFAULT_BLOCK_BYTES)
        self.buffer_config = int(shuffle_buffer or DEFAULT_SHUFFLE_BUFFER)  # before clamping to a share
        self.shuffle_buffer = self.buffer_for(self.per_rank)
        self.segments: tuple = ()
        self._seg_cache: Optional[tuple] = None
        offsets = ds.image_offsets
        self.plan = plan.RankPlan(
            offsets, rank, world_size, self.per_rank, seed, shuffle, shuffle_mode,
            plan.block_images_for(offsets, ds.reader.file_size, self.block_bytes),
        )

    def __len__(self) -> int:
        return self._len

    def buffer_for(self, share_size: int) -> int:
        """The shuffle buffer (torch: window; DALI: ``initial_fill``) over a share of
        ``share_size`` images: the configured size, at most the share. One rule for the
        loader and for the replay of an earlier segment, so the two draw alike."""
        return max(1, min(self.buffer_config, share_size))

    def set_epoch(self, epoch: int, start_batch: int = 0, segments: Sequence = ()) -> None:
        """Iterate ``epoch`` from batch ``start_batch`` of the current segment; ``segments``:
        the parts of this epoch already run at other world sizes / per-rank batches
        (:class:`trainer.data.plan.Segment`; their images are not served again)."""
        self.epoch, self.start_batch = int(epoch), int(start_batch)
        self.segments = plan.coerce_segments(segments)

    # --------------------------------------------------------------- segments
    def consumed(self, share: np.ndarray, epoch: int, rank: int, segment: int, world_size: int,
                 batch_size: int, batches: int) -> np.ndarray:
        """The images of ``share`` that ``rank`` consumed in its first ``batches`` batches of that
        segment, in consumption order (the loader's own order: :data:`trainer.data.plan.Consumed`)."""
        raise NotImplementedError

    def segment(self, epoch: int) -> Tuple[np.ndarray, int]:
        """(this rank's image indices in the current segment of ``epoch`` in stream order, segment index).

        Without segments: :meth:`RankPlan.rank_positions` (O(P)); otherwise the
        remainder ``L_k`` of the epoch is recomputed once (O(N)) and cached.
        """
        if not self.segments:
            return self.plan.rank_positions(epoch), 0
        key = (epoch, self.segments)
        if self._seg_cache is None or self._seg_cache[0] != key:
            rest = plan.remaining_stream(self.plan.stream(epoch), self.segments, epoch, self.consumed)
            per = plan.batches_per_rank(rest.size, self.world_size, self.batch_size) * self.batch_size
            self._seg_cache = (key, rest[self.rank * per:(self.rank + 1) * per].copy())
        return self._seg_cache[1], len(self.segments)

    def segment_len(self) -> int:
        """Batches of the current segment (``len()`` without segments)."""
        return len(self.segment(self.epoch)[0]) // self.batch_size if self.segments else self._len
