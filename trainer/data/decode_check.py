"""One verdict on a bad record: what ``data_tools validate`` rejects, the DALI loader refuses too.

DALI's JPEG decoders accept some corrupt files that ``validate`` and the torch loader
reject (bytes flipped in the entropy-coded data decode to a garbled image without an
error), so the DALI loader would train on them silently. Every image record is
therefore decoded once with the decoder ``validate`` uses
(:func:`trainer.io.images.decode_rgb` at the training size) before DALI may hand it
to training.

**Chunks.** The unit of the verdict is a *chunk*: the indexed image records whose
byte offset lies in tile ``c = offset // CHUNK_BYTES`` of the ``.rec``. Chunks depend
on the file alone, not on the world size, batch, seed or shuffle, so a verdict
written by any rank at any world size (or by ``validate``) is reused by every other.

**Content key.** A chunk's verdict is stored under

    key(c) = BLAKE2b-128(version, image size, keys_c, offsets_c, bytes[a_c, e_c))

where ``keys_c, offsets_c`` are the chunk's records (int64, byte order) and
``[a_c, e_c)`` the file bytes from its first record's start to its last record's end,
read once: the payloads decoded are sliced from those very bytes, so what was
decoded is what was hashed. A rewrite in place (same size, mtime, inode) changes the
key of every chunk it touches; a rewritten index changes the chunks whose records
it changes. Re-checking a verified chunk costs one read and one hash of its bytes
(no decode): the "warm" pass, measured by ``bench/data_scale.py``.

**Store.** One file of 16-byte slots per dataset path and image size
(``$UNPG_DATA_CACHE/decode-verdicts/``; slot ``c`` at byte ``16 c``). A slot holds
the key of the chunk's verified content, written with one ``pwrite`` by whoever
verified it; a torn or stale slot can only mismatch (the chunk is checked again),
never pass other content.

**When.** The DALI loader checks, in a background thread, the chunks of the rank's
epoch index in the order DALI reads them (byte order), and releases batch ``b`` to
training only once every record DALI can have drawn for it is checked
(:class:`RunAhead`, :func:`records_before_batch`); the first bad record stops the
run with :class:`BadRecordError` naming the file and key. ``data_tools validate``
checks every chunk (all cores) and writes the whole-dataset verdict.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, List, Optional, Tuple, Union

import numpy as np

from trainer.data.face_rec import FaceRecDataset
from trainer.data.irheader import unpack
from trainer.data.node_cache import cache_root
from trainer.data.recordio import MAX_LENGTH, RecordIOError, parse_record_at
from trainer.io.images import ImageDecodeError, decode_rgb

log = logging.getLogger("trainer")

#: bytes of ``.rec`` per chunk (the unit of a verdict; fixed: changing it re-checks everything).
CHUNK_BYTES = 1 << 20
_VERSION = b"unpg-decode-verdict-v1"
_SLOT = 16


class BadRecordError(RuntimeError):
    """An image record that ``data_tools validate`` would reject."""


def _fix(err: str, ds: FaceRecDataset) -> str:
    return (f"{err}. The DALI loader refuses records that `data_tools validate` rejects (its decoder "
            f"would train on them silently): run `python -m data_tools validate {ds.data_dir} "
            "--write-index` to list them all and write an index without them")


class ChunkVerdicts:
    """The chunks of ``ds`` and their verdict store; :meth:`check` verifies one chunk."""

    def __init__(self, ds: FaceRecDataset, size: Optional[Tuple[int, int]] = (112, 112),
                 chunk_bytes: Optional[int] = None):
        self.ds = ds
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.chunk_bytes = int(chunk_bytes or CHUNK_BYTES)
        offs = np.asarray(ds.image_offsets)
        if offs.size > 1 and not bool(np.all(offs[1:] >= offs[:-1])):
            order = np.argsort(offs, kind="stable")
            self._keys, self._offs = np.asarray(ds.image_keys)[order], offs[order]
        else:
            self._keys, self._offs = np.asarray(ds.image_keys), offs
        self.file_size = ds.reader.file_size
        self.num_chunks = -(-max(1, self.file_size) // self.chunk_bytes)
        self._bounds = np.searchsorted(self._offs, np.arange(self.num_chunks + 1, dtype=np.int64)
                                       * self.chunk_bytes, side="left")
        self._verified = set()  # chunks verified by this process (not re-hashed in later epochs)
        self._lock = threading.Lock()
        self._fd: Optional[int] = None
        self.store = self._store_path()
        try:
            self.store.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.store, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:  # a read-only cache: verdicts live in this process only
            log.warning("decode verdicts not stored (%s): %s", self.store, e)

    def _store_path(self) -> Path:
        base = cache_root()
        tag = f"{self.ds.rec_path.resolve()}|{self.size}|{self.chunk_bytes}".encode()
        return base / "decode-verdicts" / f"{self.ds.rec_path.stem}-{hashlib.sha1(tag).hexdigest()[:16]}.bin"

    # ---------------------------------------------------------------- chunks
    def chunk_records(self, c: int) -> Tuple[np.ndarray, np.ndarray]:
        """(keys, offsets) of chunk ``c``, byte order."""
        a, b = int(self._bounds[c]), int(self._bounds[c + 1])
        return self._keys[a:b], self._offs[a:b]

    def chunks_of(self, offsets: np.ndarray) -> np.ndarray:
        """The chunks holding records at ``offsets``, in first-appearance order."""
        ch = np.asarray(offsets, dtype=np.int64) // self.chunk_bytes
        _, first = np.unique(ch, return_index=True)
        return ch[np.sort(first)]

    def all_chunks(self) -> np.ndarray:
        return np.flatnonzero(np.diff(self._bounds) > 0)

    # ---------------------------------------------------------------- store
    def _stored(self, c: int) -> bytes:
        if self._fd is None:
            return b""
        try:
            return os.pread(self._fd, _SLOT, c * _SLOT)
        except OSError:
            return b""

    def _store(self, c: int, key: bytes) -> None:
        if self._fd is not None:
            try:
                os.pwrite(self._fd, key, c * _SLOT)
            except OSError:
                pass

    # ---------------------------------------------------------------- check
    def check(self, c: int, decode: bool = True, stop_at_first: bool = True
              ) -> Tuple[bytes, List[Tuple[int, str]], int]:
        """Verify chunk ``c``: (content key, [(key, error)], images decoded now).

        Reads the chunk's bytes once, hashes them; when the store holds that key
        (or ``decode`` is False) nothing is decoded; else every record is decoded
        from those bytes and, if all decode, the key is stored.
        """
        keys, offs = self.chunk_records(c)
        if keys.size == 0:
            return b"", [], 0
        rec = self.ds.rec_path
        a = int(offs[0])
        fd = self.ds.reader._fileno()
        want = min(self.file_size, max((c + 1) * self.chunk_bytes, int(offs[-1]) + 8) + (64 << 10)) - a
        buf = bytearray(os.pread(fd, want, a))

        def extend(stop: int) -> None:  # bytes [a, stop) in buf (the hash covers them)
            stop = min(stop, self.file_size)
            while a + len(buf) < stop:
                got = os.pread(fd, stop - a - len(buf), a + len(buf))
                if not got:
                    break
                buf.extend(got)

        def reader(off: int, n: int) -> bytes:
            extend(off + n)
            return bytes(buf[off - a:off - a + n])

        def content_key(end: int) -> bytes:
            extend(end)
            h = hashlib.blake2b(_VERSION, digest_size=_SLOT)
            h.update(repr(self.size).encode())
            h.update(np.ascontiguousarray(keys, dtype=np.int64).tobytes())
            h.update(np.ascontiguousarray(offs, dtype=np.int64).tobytes())
            h.update(memoryview(buf)[:end - a])
            return h.digest()

        # warm path: the span ends where the last record's framing says (a whole record); no
        # per-record parsing unless the key is unknown
        last = int(offs[-1])
        head = reader(last, 8) if last + 8 <= self.file_size else b""
        lrec = int.from_bytes(head[4:8], "little") if len(head) == 8 else 1 << 29
        if lrec >> 29 == 0 and last + 8 + (lrec & MAX_LENGTH) <= self.file_size:
            end = last + 8 + ((lrec & MAX_LENGTH) + 3 & ~3)
            key = content_key(min(end, self.file_size))
            if not decode or self._stored(c) == key:
                return key, [], 0
        payloads: List[Tuple[int, Union[bytes, RecordIOError]]] = []
        end = a
        for k, o in zip(keys.tolist(), offs.tolist()):
            try:
                p, nxt = parse_record_at(reader, o, self.file_size, lambda k=k: f"{rec} (key {k})")
                end = max(end, nxt)
                payloads.append((k, p))
            except RecordIOError as e:
                payloads.append((k, e))
                end = max(end, min(self.file_size, o + 8))
        # every decoded byte lies in [a, end): what is decoded is what is hashed
        key = content_key(min(end, self.file_size))
        if self._stored(c) == key or not decode:
            return key, [], 0
        bad: List[Tuple[int, str]] = []
        for k, p in payloads:
            try:
                if isinstance(p, RecordIOError):
                    raise p
                _, img = unpack(p, f"{rec} (key {k})")
                if not img:
                    raise RecordIOError(f"{rec} (key {k}): empty image (record holds a header only)")
                decode_rgb(img, f"{rec} (key {k})", size=self.size)
            except (ImageDecodeError, RecordIOError) as e:
                bad.append((k, str(e)))
                if stop_at_first:
                    break
        if not bad:
            self._store(c, key)
        return key, bad, len(payloads)

    def ensure(self, c: int) -> int:
        """Verify chunk ``c`` (once per process); :class:`BadRecordError` on its first bad record.
        Returns how many images were decoded now."""
        if c in self._verified:
            return 0
        _, bad, n = self.check(c)
        if bad:
            raise BadRecordError(_fix(bad[0][1], self.ds))
        with self._lock:
            self._verified.add(c)
        return n

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - __del__ never raises
            pass


def ensure_decodable(ds: FaceRecDataset, offsets: Optional[np.ndarray] = None, num_threads: int = 1,
                     size: Optional[Tuple[int, int]] = (112, 112), verdicts: Optional[ChunkVerdicts] = None) -> int:
    """Verify the chunks holding the records at ``offsets`` (all when None), up front;
    :class:`BadRecordError` on the first bad record. Returns how many images were decoded."""
    v = verdicts or ChunkVerdicts(ds, size)
    chunks = v.all_chunks() if offsets is None else v.chunks_of(offsets)
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        return sum(pool.map(v.ensure, chunks.tolist()))


def records_before_batch(batch: int, batch_size: int, shuffle_buffer: int, shuffle: bool) -> int:
    """How many records of its (byte-ordered) index DALI's reader can have read when it
    emits the last sample of batch ``batch``: the reader fills ``initial_fill`` then reads one
    per sample drawn, ahead by its prefetch queue (2 batches); one batch more as margin.
    ``tests/data/test_decode_check.py`` checks the bound against DALI itself."""
    fill = shuffle_buffer if shuffle else 0
    return (batch + 1) * batch_size + fill + 3 * batch_size


class RunAhead:
    """Checks the chunks of an epoch index in reading order in a background thread pool;
    :meth:`wait` blocks until the first ``m`` records of the index are covered."""

    #: seconds without one chunk verified before :meth:`wait` gives up (a hung read).
    STALL_S = 600.0

    def __init__(self, verdicts: ChunkVerdicts, offsets: np.ndarray, num_threads: int = 1):
        self.v = verdicts
        offs = np.asarray(offsets, dtype=np.int64)
        ch = offs // verdicts.chunk_bytes
        self.chunks = np.unique(ch)  # ascending: DALI reads its index in byte order
        # records [0, m) of the index are covered once chunks [0, need[m - 1]] are verified
        self._need = np.maximum.accumulate(np.searchsorted(self.chunks, ch)) if ch.size else ch
        self.done = 0  # chunks [0, done) verified
        self.decoded = 0
        self.error: Optional[BaseException] = None
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, args=(max(1, num_threads),), daemon=True,
                                        name="unpg-decode-check")
        self._thread.start()

    def _run(self, threads: int) -> None:
        try:
            with ThreadPoolExecutor(threads) as pool:
                it = pool.map(self._one, self.chunks.tolist())
                for n in it:
                    with self._cv:
                        self.done += 1
                        self.decoded += n
                        self._cv.notify_all()
                        if self._stop:
                            break
        except BaseException as e:  # noqa: BLE001 (handed to the training thread)
            with self._cv:
                self.error = e
                self._cv.notify_all()
        finally:
            with self._cv:
                self._stop = True
                self._cv.notify_all()

    def _one(self, c: int) -> int:
        if self._stop:
            return 0
        return self.v.ensure(c)

    def wait(self, m: int) -> None:
        """Return once records [0, m) of the index are verified; raise the checker's error."""
        if m <= 0 or self._need.size == 0:
            return
        need = int(self._need[min(m, self._need.size) - 1]) + 1
        import time

        with self._cv:
            last, since = self.done, time.monotonic()
            while self.done < need and self.error is None:
                if self._stop and self.done < need:
                    break
                self._cv.wait(min(1.0, self.STALL_S))
                if self.done != last:
                    last, since = self.done, time.monotonic()
                elif time.monotonic() - since > self.STALL_S:
                    raise TimeoutError(
                        f"{self.v.ds.rec_path}: the decode check verified no chunk for {self.STALL_S:.0f} s "
                        f"(chunk {int(self.chunks[self.done])} of the file, {self.done} of {self.chunks.size} "
                        "done): a hung read?")
            if self.error is not None:
                raise self.error
            if self.done < need:
                raise RuntimeError(f"{self.v.ds.rec_path}: the decode check stopped after "
                                   f"{self.done} of {self.chunks.size} chunks")

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()


def validate_chunks(ds: FaceRecDataset, size: Optional[Tuple[int, int]], workers: int,
                    progress: bool) -> Tuple[List[Tuple[int, str]], int, int]:
    """Check every chunk of ``ds`` with ``workers`` processes (``data_tools validate``), every
    bad record listed; writes each good chunk's verdict. Returns ([(key, error)], images
    decoded, chunks verified)."""
    import multiprocessing as mp

    from tqdm import tqdm

    global _WORKER
    v = ChunkVerdicts(ds, size)
    chunks = v.all_chunks().tolist()
    _WORKER = v
    bad: List[Tuple[int, str]] = []
    decoded = ok = 0
    bar = tqdm(total=int(ds.image_keys.size), desc="decode check", unit="img", unit_scale=True,
               disable=not progress)
    try:
        if workers > 1 and len(chunks) > 1:
            v.close()  # each worker opens its own descriptors
            with mp.get_context("fork").Pool(workers) as pool:
                results: Iterable = pool.imap(_worker_check, chunks, chunksize=1)
                for c, r in zip(chunks, results):
                    decoded, ok = _tally(c, r, v, bad, bar, decoded, ok)
        else:
            for c in chunks:
                decoded, ok = _tally(c, _worker_check(c), v, bad, bar, decoded, ok)
    finally:
        bar.close()
        _WORKER = None
    return bad, decoded, ok


_WORKER: Optional[ChunkVerdicts] = None


def _worker_check(c: int):
    v = _WORKER
    assert v is not None, "set before the pool forks"
    if v._fd is None:
        try:
            v._fd = os.open(v.store, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            pass
    return v.check(c, stop_at_first=False)


def _tally(c, r, v: ChunkVerdicts, bad, bar, decoded, ok):
    key, errs, n = r
    bad.extend(errs)
    bar.update(int(v._bounds[c + 1] - v._bounds[c]))
    return decoded + n, ok + (not errs)


__all__ = ["BadRecordError", "CHUNK_BYTES", "ChunkVerdicts", "RunAhead", "ensure_decodable",
           "records_before_batch", "validate_chunks"]
