"""DALI pipeline over the RecordIO files: ``fn.readers.mxnet`` -> decode -> flip -> uint8 NHWC.

How the DALI pitfalls found with 2.x are handled (docs/data.md):

* DALI reads *every* offset of the index it is given (keys ignored, offsets
  sorted): header and identity records would become 0-byte images. We feed it
  an index the project writes, listing only image records.
* A bad line in an ``.idx`` silently ends DALI's epoch: the project parses the
  index strictly first (clear error naming the line) and DALI only ever sees
  an index we wrote.
* Labels, empty images, framing of every image record's head are checked by
  :meth:`FaceRecDataset.scan` before DALI starts (errors name file and key).
  Undecodable JPEG payloads reach the decoder: DALI 2.2-2.4 segfault on one in
  a batch >= 32, so ``nvidia-dali-cuda120`` is pinned to 2.1.1, which raises;
  we re-raise naming the file and the ``validate`` command that finds it.
  Corrupt JPEGs that DALI decodes without an error (garbled pixels) are caught
  by :mod:`trainer.data.decode_check` (the decoder ``validate`` and the torch
  loader use): a background check runs ahead of DALI's reader over the rank's
  epoch index and a batch is handed to training only once every record DALI can
  have drawn for it is verified; verdicts per chunk of the file, keyed by
  content, shared by every rank and world size (a validated dataset is only
  re-hashed, not decoded).
* Shards: each epoch every rank writes an index of **its own** share of the
  epoch (:class:`trainer.data.plan.RankPlan`: whole blocks of records from the
  block shuffle, or its chunk of a global permutation; ``len * batch`` images,
  sorted by byte offset, formatted with numpy in chunks) and DALI reads it as
  its only shard (``num_shards=1``): O(N / world_size) per rank.
  ``pad_last_batch=True``, so no sample leaks across epochs and every rank runs
  exactly ``len(loader)`` batches.
* The shuffle is a local buffer (``initial_fill``): default 8192 (clamped to the
  shard), with a warning when the file is identity-sorted so that the buffer
  holds too few identities per batch (``data_tools shuffle`` fixes the file).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Any, Iterator, Optional, Tuple

import numpy as np
import torch

from trainer.data.augment import AugmentConfig, apply_dali
from trainer.data.decode_check import BadRecordError, ChunkVerdicts, RunAhead, records_before_batch
from trainer.data.face_rec import FaceRecDataset, warn_if_identity_sorted
from trainer.data.loader_base import DEFAULT_SHUFFLE_BUFFER, FaceLoaderBase  # noqa: F401 (re-export)
from trainer.data.recordio import write_index_arrays
from trainer.section import ConfigError

#: the DALI release this project is tested with (requirements.txt pins it).
DALI_VERSION = "2.1.1"


def dali_available() -> bool:
    try:
        import nvidia.dali
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - a DALI that fails to import (any error) is not available
        return False
    return True


def _build_pipeline(rec: str, idx: str, batch_size: int, num_threads: int, device_id: Optional[int],
                    shard_id: int, num_shards: int, shuffle: bool, initial_fill: int, seed: int,
                    flip: bool, augment: Optional[AugmentConfig], size: Tuple[int, int]):
    import nvidia.dali

    # DALI's operators are generated at import time; its type stubs lack most of them
    fn: Any = nvidia.dali.fn
    types: Any = nvidia.dali.types
    pipeline_def: Any = nvidia.dali.pipeline_def  # pyright: ignore[reportPrivateImportUsage]

    gpu = device_id is not None

    @pipeline_def
    def face_pipe():
        jpegs, labels = fn.readers.mxnet(
            path=[rec], index_path=[idx], shard_id=shard_id, num_shards=num_shards,
            random_shuffle=shuffle, initial_fill=initial_fill, pad_last_batch=True,
            stick_to_shard=True, name="Reader",
        )
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        if augment is not None and augment.active():
            images = apply_dali(images, augment, "gpu" if gpu else "cpu", size)
        mirror = fn.random.coin_flip(probability=0.5) if flip else 0
        # uint8 HWC out (a quarter of float32's bytes); the mirror is folded into this copy.
        # Cast and normalisation happen on the training device (trainer.data.model_input.to_model_input).
        images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="HWC", mirror=mirror)
        return images, labels[0:1]

    pipe = face_pipe(batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id,
                     seed=seed, prefetch_queue_depth=2, exec_dynamic=False)
    pipe.build()
    return pipe


def _dali_reason(msg: str) -> str:
    lines = [line.strip() for line in msg.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("encountered") and i + 1 < len(lines):
            return lines[i + 1]
    return lines[-1] if lines else msg


class DaliDataError(RuntimeError):
    """DALI failed on a record; the message names the file, key and the fix."""


class DaliElasticError(ConfigError):
    """A shuffled DALI epoch cannot continue exactly once at another world size / per-rank batch."""


def replay_reader(tmp: str, n: int, batch_size: int, batches: int, initial_fill: int, seed: int,
                  num_threads: int) -> np.ndarray:
    """Positions (0..n-1, in the byte order DALI reads) that ``fn.readers.mxnet`` as built by
    :func:`_build_pipeline` serves in its first ``batches`` batches, from a stand-in file of n
    records (label = (position >> 12, position & 4095), exact in float32, never negative, so never
    RecordIO's magic word); O(n) bytes of disk."""
    import nvidia.dali

    from trainer.data.irheader import IR_SIZE, IRHeader, pack
    from trainer.data.recordio import encode_record

    fn: Any = nvidia.dali.fn  # generated operators: not in DALI's type stubs
    pipeline_def: Any = nvidia.dali.pipeline_def  # pyright: ignore[reportPrivateImportUsage]

    rec = np.frombuffer(encode_record(pack(IRHeader(2, np.zeros(2, np.float32)), b"x")), dtype=np.uint8)
    at = 8 + IR_SIZE  # RecordIO head (magic, length), then the IRHeader, then the two labels
    recs = np.tile(rec, (n, 1))
    j = np.arange(n, dtype=np.int64)
    labels = np.stack([j >> 12, j & 4095], axis=1).astype("<f4")
    recs[:, at:at + 8] = labels.view(np.uint8).reshape(n, 8)
    path = os.path.join(tmp, "replay.rec")
    with open(path, "wb") as f:
        f.write(recs.tobytes())
    idx = os.path.join(tmp, "replay.idx")
    write_index_arrays(idx, j, j * rec.size)

    @pipeline_def
    def reader_only():
        _, lab = fn.readers.mxnet(path=[path], index_path=[idx], shard_id=0, num_shards=1, random_shuffle=True,
                                  initial_fill=initial_fill, pad_last_batch=True, stick_to_shard=True, name="Reader")
        return lab

    pipe = reader_only(batch_size=batch_size, num_threads=max(1, num_threads), device_id=None, seed=seed,
                       prefetch_queue_depth=2, exec_dynamic=False)
    pipe.build()
    out = []
    try:
        for _ in range(batches):
            (lab,) = pipe.run()
            arr = np.stack([np.asarray(lab[i]).reshape(-1)[:2] for i in range(len(lab))]).astype(np.int64)
            out.append((arr[:, 0] << 12) | arr[:, 1])
    finally:
        del pipe
        for p in (path, idx):
            try:
                os.unlink(p)
            except OSError:
                pass
    got = np.concatenate(out) if out else np.zeros(0, np.int64)
    if got.size != batches * batch_size or np.unique(got).size != got.size or (got.size and got.max() >= n):
        raise RuntimeError(f"the replay served {got.size} positions ({np.unique(got).size} distinct) "
                           f"for {batches} batches of {batch_size} of {n} records")
    return got


class DaliFaceLoader(FaceLoaderBase):
    """DALI-backed loader; same interface as :class:`trainer.data.torch_loader.TorchFaceLoader`."""

    backend = "dali"

    def __init__(self, ds: FaceRecDataset, batch_size: int, rank: int, world_size: int,
                 device: torch.device, num_threads: int = 2, seed: int = 0,
                 augment: Optional[AugmentConfig] = None, shuffle: bool = True, flip: bool = True,
                 shuffle_buffer: Optional[int] = None, image_size: Tuple[int, int] = (112, 112),
                 shuffle_mode: str = "block", block_bytes: Optional[int] = None):
        import warnings

        import nvidia.dali

        if nvidia.dali.__version__ != DALI_VERSION:
            warnings.warn(
                f"nvidia-dali {nvidia.dali.__version__} is not the tested {DALI_VERSION}: DALI 2.2-2.4 "
                "crash (segfault) on an undecodable image; run `python -m data_tools validate DATA "
                "--write-index` first or install the pinned version",
                stacklevel=2,
            )
        super().__init__(ds, batch_size, rank, world_size, device, num_threads, seed, augment,
                         shuffle, flip, image_size, shuffle_mode, block_bytes, shuffle_buffer)
        self.verdicts = ChunkVerdicts(ds, self.image_size)  # validate's verdict, checked ahead of DALI
        if shuffle:
            warn_if_identity_sorted(ds, batch_size, self.shuffle_buffer)
        self._offsets = ds.image_offsets
        self._tmp = tempfile.mkdtemp(prefix="unpg-dali-")

    def _pipeline_seed(self, epoch: int, rank: int, segment: int) -> int:
        key = [self.seed, epoch, rank] + ([segment] if segment else [])
        return int(np.random.default_rng(key).integers(0, 2**31 - 1))

    def consumed(self, share: np.ndarray, epoch: int, rank: int, segment: int, world_size: int,
                 batch_size: int, batches: int) -> np.ndarray:
        """What ``rank``'s DALI reader served in its first ``batches`` batches of that segment.

        DALI reads the share in byte order; unshuffled that is the order. Shuffled, its reader
        buffer picks the order inside the pipeline, so it is replayed (:func:`replay_reader`):
        the same reader with the same seed, batch size and ``initial_fill`` over a stand-in file
        of ``len(share)`` tiny records whose labels are their positions. The draws of DALI's
        reader do not depend on the records' contents (checked against the real pipeline in
        tests/data/test_loaders.py); raises :class:`DaliElasticError` if the replay fails.
        """
        srt = share[np.argsort(self._offsets[share], kind="stable")]
        take = batches * batch_size
        if not self.shuffle or take == 0:
            return srt[:take]
        fill = self.buffer_for(share.size)  # what that segment's loader used
        try:
            pos = replay_reader(self._tmp, share.size, batch_size, batches, fill,
                                self._pipeline_seed(epoch, rank, segment), self.num_threads)
        except Exception as e:  # any DALI failure: refuse rather than guess
            raise DaliElasticError(
                f"{self.ds.rec_path}: epoch {epoch} was interrupted after {batches} batches at {world_size} ranks x "
                f"batch {batch_size} and resumes at {self.world_size} x {self.batch_size}: replaying rank {rank}'s "
                f"DALI reader failed ({type(e).__name__}: {e}); resume at the same world size and data.batch_size, "
                "or with data.backend=torch") from e
        return srt[pos]

    def rank_index_arrays(self, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        """(keys, byte offsets) of this rank's images in ``epoch`` (its current segment),
        in the order DALI reads them."""
        pos, _ = self.segment(epoch)
        offs = self._offsets[pos]
        o = np.argsort(offs, kind="stable")  # DALI reads its index in byte order
        return self.ds.image_keys[pos[o]], offs[o]

    def _epoch_index(self, epoch: int) -> str:
        keys, offs = self.rank_index_arrays(epoch)
        path = os.path.join(self._tmp, f"epoch{epoch}-rank{self.rank}.idx")
        write_index_arrays(path, keys, offs)
        return path

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        import nvidia.dali.plugin.pytorch as dali_torch

        DALIGenericIterator: Any = dali_torch.DALIGenericIterator
        LastBatchPolicy: Any = dali_torch.LastBatchPolicy  # pyright: ignore[reportPrivateImportUsage]

        epoch, start = self.epoch, self.start_batch
        self.start_batch = 0
        keys, offs = self.rank_index_arrays(epoch)
        k, n_batches = len(self.segments), keys.size // self.batch_size
        if n_batches == 0:
            return  # the segment's remainder does not fill one batch per rank: the epoch ends
        idx = os.path.join(self._tmp, f"epoch{epoch}-rank{self.rank}.idx")
        write_index_arrays(idx, keys, offs)
        check = RunAhead(self.verdicts, offs, self.num_threads)
        device_id = self.device.index if self.device.type == "cuda" else None
        if self.device.type == "cuda" and device_id is None:
            device_id = torch.cuda.current_device()
        pipe = _build_pipeline(
            str(self.ds.rec_path), idx, self.batch_size, self.num_threads, device_id,
            0, 1, self.shuffle, self.buffer_for(keys.size),
            self._pipeline_seed(epoch, self.rank, k),
            self.flip, self.augment, self.image_size,
        )
        it = None
        try:
            # the iterator runs the pipeline already while being constructed (prefetch)
            it = DALIGenericIterator(pipe, ["images", "labels"], reader_name="Reader",
                                     last_batch_policy=LastBatchPolicy.DROP, auto_reset=False)
            for b in range(n_batches):
                try:
                    out = next(it)[0]
                except StopIteration:
                    raise RuntimeError(
                        f"{self.ds.rec_path}: DALI ended the epoch after {b} of {n_batches} batches"
                    ) from None
                if b < start:
                    continue  # resume: the local shuffle is only reproducible by replaying
                # every record DALI can have drawn up to this batch is verified (or the run stops)
                check.wait(records_before_batch(b, self.batch_size, self.shuffle_buffer, self.shuffle))
                images = out["images"]
                labels = out["labels"].reshape(-1).to(torch.int64)
                if images.device != self.device:
                    images = images.to(self.device, non_blocking=True)
                    labels = labels.to(self.device, non_blocking=True)
                elif labels.device != self.device:
                    labels = labels.to(self.device)
                yield images, labels
        except BadRecordError:
            raise  # the decode check's verdict names file and key already
        except RuntimeError as e:
            if "DALI ended the epoch" in str(e) or "decode check stopped" in str(e):
                raise
            raise DaliDataError(self._explain(e, epoch)) from None
        finally:
            check.close()
            del it, pipe
            try:
                os.unlink(idx)
            except OSError:
                pass

    def _explain(self, e: Exception, epoch: int) -> str:
        """DALI's error with the record key it concerns (DALI names the byte offset)."""
        msg = str(e)
        m = re.search(r"at index (\d+)", msg)
        where = ""
        if m:
            off = int(m.group(1))
            keys = [int(self.ds.image_keys[i]) for i in np.nonzero(self._offsets == off)[0]]
            if keys:
                where = f" record key {keys[0]} (byte {off})"
        kind = "undecodable image" if "decoder" in msg or "jpeg" in msg.lower() else "pipeline error"
        return (
            f"{self.ds.rec_path}:{where}: DALI stopped in epoch {epoch} ({kind}). Find every bad "
            f"record with `python -m data_tools validate {self.ds.data_dir}` and exclude them with "
            f"--write-index. DALI said: {_dali_reason(msg)}"
        )

    def __del__(self):
        shutil.rmtree(getattr(self, "_tmp", ""), ignore_errors=True)
