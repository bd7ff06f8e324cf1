"""insightface face datasets on top of RecordIO: header record, identity records, labels.

Layout (docs/design.md §3): ``data_dir/train.rec``, ``train.idx``, ``property``
("num_classes,112,112"). Record 0 may be a header with flag > 0 whose labels
are ``(first_identity_key, end_key)``: images are keys ``1 .. label[0]-1``,
keys ``label[0] .. label[1]-1`` are identity records (labels = that identity's
[first, end) image keys) and never images. Without such a header every key is
an image. The physical order in the file may differ from key order.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np

from trainer.data.irheader import IR_SIZE, MAX_EXACT_LABEL, class_id, unpack
from trainer.data.node_cache import DEFAULT_LOCK_TIMEOUT, cache_dir, cached_labels, load_index_cached
from trainer.data.recordio import (
    MAGIC,
    MAX_LENGTH,
    ArrayIndexedRecordReader,
    RecordIOError,
    write_index_arrays,
)

PathLike = Union[str, os.PathLike]


def read_property(data_dir: PathLike) -> Optional[Tuple[int, int, int]]:
    """``property`` -> (num_classes, height, width), or None when the file is absent."""
    p = Path(data_dir) / "property"
    if not p.is_file():
        return None
    text = p.read_text().strip()
    try:
        vals = [int(x) for x in text.split(",")]
        if len(vals) != 3 or vals[0] <= 0:
            raise ValueError
    except ValueError:
        raise RecordIOError(f"{p}: expected 'num_classes,height,width', got {text[:80]!r}") from None
    return vals[0], vals[1], vals[2]


def write_property(data_dir: PathLike, num_classes: int, h: int = 112, w: int = 112) -> None:
    from trainer.io.atomic import atomic_open

    with atomic_open(Path(data_dir) / "property", "wb") as f:
        f.write(f"{num_classes},{h},{w}".encode())


class FaceRecDataset:
    """Random access to an insightface-style (or plain) image .rec.

    Attributes: ``image_keys`` (int64 array, key order), ``header`` ((first_id_key,
    end_key) or None), ``num_classes`` (from ``property`` if present, else
    max label + 1 after :meth:`scan`).
    """

    def __init__(self, data_dir: PathLike, rec_name: str = "train", lock_timeout: Optional[float] = None):
        self.data_dir = Path(data_dir)
        #: seconds to wait on the node's index/label locks without progress by their holder
        self.lock_timeout = DEFAULT_LOCK_TIMEOUT if lock_timeout is None else float(lock_timeout)
        rec = self.data_dir / f"{rec_name}.rec"
        idx = self.data_dir / f"{rec_name}.idx"
        if not rec.is_file():
            raise FileNotFoundError(f"RecordIO file not found: {rec}")
        if not idx.is_file():
            raise FileNotFoundError(
                f"RecordIO index not found: {idx} (rebuild it with `python -m data_tools validate "
                f"{self.data_dir} --write-index`)"
            )
        self._paths = (rec, idx)
        self.reader = ArrayIndexedRecordReader(
            rec, idx, load_index_cached(cache_dir(rec, idx), idx, self.lock_timeout))
        prop = read_property(self.data_dir)
        self._property_classes = prop[0] if prop else None
        self.header: Optional[Tuple[int, int]] = None
        self.missing_images = 0
        keys = self.reader.offsets.key_array
        if keys.size > 1 and not bool(np.all(keys[1:] > keys[:-1])):
            keys = np.sort(keys)
        if 0 in self.reader:
            h, _ = unpack(self.reader.read(0), self.reader.where(0))
            if h.flag > 0:
                lab = h.labels
                if lab.size < 2 or lab[0] != int(lab[0]) or lab[1] != int(lab[1]) or not 1 <= lab[0] <= lab[1]:
                    raise RecordIOError(
                        f"{self.reader.where(0)}: insightface header labels {lab.tolist()} are not "
                        "(first_identity_key, end_key)"
                    )
                self.header = (int(lab[0]), int(lab[1]))
        if self.header is not None:
            first_id = self.header[0]
            self.image_keys = keys[(keys >= 1) & (keys < first_id)]
            self.missing_images = (first_id - 1) - int(self.image_keys.size)
            if self.missing_images:
                # a cleaned index (`data_tools validate --write-index`) leaves bad records out
                warnings.warn(
                    f"{self.reader.idx_path}: {self.missing_images} of the {first_id - 1} image keys "
                    "the header lists are not in the index; they are skipped",
                    stacklevel=2,
                )
        else:
            self.image_keys = keys
        self.labels: Optional[np.ndarray] = None

    # ------------------------------------------------------------------ basics
    @property
    def rec_path(self) -> Path:
        return self.reader.rec_path

    @property
    def image_offsets(self) -> np.ndarray:
        """Byte offsets (int64) of the image records, aligned with ``image_keys``."""
        if getattr(self, "_image_offsets", None) is None:
            self._image_offsets = self.reader.offsets.lookup(self.image_keys)
        return self._image_offsets

    @property
    def num_images(self) -> int:
        return int(self.image_keys.size)

    @property
    def num_classes(self) -> int:
        if self._property_classes is not None:
            return self._property_classes
        if self.header is not None:
            return self.header[1] - self.header[0]
        labels = self.scan()
        return int(labels.max()) + 1 if labels.size else 0

    def read_image(self, key: int) -> Tuple[int, bytes]:
        """(class id, encoded image bytes) of image record ``key``; validated."""
        payload = self.reader.read(key)
        try:  # error text (file, key, byte) is built only when needed
            h, img = unpack(payload, "")
            cid = class_id(h, "", self._property_classes)
            if not img:
                raise RecordIOError(": empty image (record holds a header only)")
        except RecordIOError as e:
            raise RecordIOError(f"{self.reader.where(key)}{e}") from None
        return cid, img

    # ------------------------------------------------------------------ label scan
    @property
    def cache_dir(self) -> Path:
        """This dataset's folder in the node's cache (:func:`trainer.data.node_cache.cache_dir`)."""
        return cache_dir(*self._paths)

    def scan(self, progress: Optional[bool] = None, lock_timeout: Optional[float] = None) -> np.ndarray:
        """Labels of every image record (int64, aligned with ``image_keys``).

        Reads only the record headers (plus the IRHeader), checks framing, that
        the image is not empty and the label is an exact integer in range.
        Cached on disk keyed by the files' size and mtime
        (:func:`trainer.data.node_cache.cached_labels`: one process per node scans, the
        others wait for its cache file, and scan themselves if the scanner died).
        ``progress``: a tqdm bar (None: when stderr is a terminal). ``lock_timeout``:
        seconds to wait without progress by the lock's holder (None: the dataset's
        ``lock_timeout``), then :class:`~trainer.data.node_cache.ScanLockTimeout`.
        """
        if self.labels is not None:
            return self.labels

        def compute(tick: Optional[Callable[[], None]]) -> np.ndarray:
            lab = self._scan_records(progress, tick)
            self.check_identity_records(lab)  # a failing dataset is never cached
            return lab

        self.labels = cached_labels(self.cache_dir / "labels.npy", str(self.rec_path), self.image_keys.shape,
                                    compute, self.lock_timeout if lock_timeout is None else lock_timeout)
        return self.labels

    def check_identity_records(self, labels: np.ndarray) -> None:
        """Every image's label equals the identity whose record lists its key (insightface
        layout: identity record ``first_id + c`` holds image keys [a, b) of class c). Counted;
        a mismatch raises :class:`RecordIOError` with the count and the first case (a label
        that disagrees would train silently). Malformed identity records are left to
        ``data_tools validate``."""
        if self.header is None or labels.size == 0:
            return
        first_id, end = self.header
        keys = self.image_keys
        expected = np.full(keys.shape, -1, dtype=np.int64)
        where = {}
        for c, k in enumerate(range(first_id, end)):
            if k not in self.reader:
                continue
            try:
                lab = unpack(self.reader.read(k), "")[0].labels
            except RecordIOError:
                continue
            if lab.size < 2:
                continue
            lo, hi = np.searchsorted(keys, [int(lab[0]), int(lab[1])])
            expected[lo:hi] = c
            where[c] = k
        bad = np.flatnonzero((expected >= 0) & (expected != labels))
        if bad.size:
            i = int(bad[0])
            raise RecordIOError(
                f"{self.rec_path}: {bad.size} of {labels.size} images have a label that disagrees with their "
                f"identity record (first: image key {int(keys[i])} has label {int(labels[i])}, identity record "
                f"key {where[int(expected[i])]} lists it under identity {int(expected[i])}); "
                f"check the dataset with `python -m data_tools validate {self.data_dir}`")

    def _scan_records(self, progress: Optional[bool], tick: Optional[Callable[[], None]] = None) -> np.ndarray:
        """Vectorised header scan: large sequential reads, numpy checks; any record the
        fast path does not accept (split records, errors) goes through :meth:`_scan_one`
        in key order, which gives the exact label or the error naming file and key."""
        if self.image_keys.size == 0:
            return np.zeros(0, dtype=np.int64)
        labels, ok = scan_labels(self.rec_path, self.image_offsets, self.reader.file_size,
                                 self._property_classes, progress, tick)
        bad = ~ok
        for i in np.flatnonzero(bad).tolist():  # key order: the first bad key raises
            labels[i] = self._scan_one(int(self.image_keys[i]))
        return labels

    def _scan_one(self, key: int) -> int:
        """The per-record path (split records; exact errors naming file and key)."""
        where = self.reader.where(key)
        head, length = self.reader.read_head(key, IR_SIZE + 64)
        flag = int.from_bytes(head[:4], "little") if len(head) >= 4 else 0
        if len(head) < IR_SIZE + 4 * flag <= length:  # a long label array (face2rec with many labels)
            head, length = self.reader.read_head(key, IR_SIZE + 4 * flag)
        h, _ = unpack(head, where)
        cid = class_id(h, where, self._property_classes)
        if length - IR_SIZE - 4 * max(h.flag, 0) <= 0:
            raise RecordIOError(f"{where}: empty image (record holds a header only)")
        return cid

    def image_index_path(self) -> Path:
        """Path of an index listing only image records (what DALI must be fed).

        DALI's mxnet reader reads every offset in the .idx, ignoring keys; the
        header and identity records would come out as 0-byte images.
        """
        p = self.cache_dir / "images.idx"
        if not p.is_file():
            p.parent.mkdir(parents=True, exist_ok=True)
            write_index_arrays(p, self.image_keys, self.image_offsets)
        return p

    def identity_order_stats(self) -> Dict[str, float]:
        """How identity-sorted the physical file is: mean run length of equal labels in byte order."""
        labels = self.scan()
        if labels.size == 0:
            return {"mean_run": 0.0, "images_per_identity": 0.0}
        offs = self.image_offsets
        in_order = offs.size < 2 or bool(np.all(offs[1:] > offs[:-1]))
        lab = labels if in_order else labels[np.argsort(offs, kind="stable")]
        runs = 1 + int(np.count_nonzero(lab[1:] != lab[:-1]))
        return {
            "mean_run": lab.size / runs,
            "images_per_identity": lab.size / max(1, int(np.count_nonzero(np.bincount(lab)))),
        }


#: the vectorised scan reads the file in sequential pieces of at most this many bytes / records.
SCAN_CHUNK_BYTES = 64 << 20
SCAN_CHUNK_RECORDS = 1 << 20
#: bytes gathered per record: 8 framing + 24 IRHeader + the first float32 of a label array.
_HEAD_BYTES = 8 + IR_SIZE + 4
#: mean bytes per record above which a group is read with one small pread per record.
_SPARSE_BYTES = 64 << 10


def _scan_group(fd: int, offs: np.ndarray, file_size: int, num_classes: Optional[int]
                ) -> Tuple[np.ndarray, np.ndarray]:
    """(labels, ok) of the records starting at sorted byte offsets ``offs``.

    ``ok`` is False for every record the fast path does not vouch for: bad
    magic, a split record (cflag != 0), truncation, a payload shorter than its
    IRHeader and label array, an empty image, a label that is not an exact
    integer in [0, min(num_classes, 2^24)). Those are re-read one by one.
    """
    m = offs.size
    start = int(offs[0])
    stop = min(int(offs[-1]) + _HEAD_BYTES, file_size)
    if (stop - start) / m <= _SPARSE_BYTES:
        buf = os.pread(fd, stop - start, start)
        arr = np.zeros(stop - start + _HEAD_BYTES, np.uint8)
        arr[:len(buf)] = np.frombuffer(buf, np.uint8)
        rel = offs - start
        heads = arr[rel[:, None] + np.arange(_HEAD_BYTES)]
    else:  # big records: only their heads, one small read each
        heads = np.zeros((m, _HEAD_BYTES), np.uint8)
        for r, off in enumerate(offs.tolist()):
            b = os.pread(fd, _HEAD_BYTES, off)
            heads[r, :len(b)] = np.frombuffer(b, np.uint8)
    u = heads.view("<u4")  # [m, 9]: magic, lrec, flag, label, id lo/hi, id2 lo/hi, first array label
    f = heads.view("<f4")
    magic, lrec, flag = u[:, 0], u[:, 1], u[:, 2].astype(np.int64)
    length = (lrec & MAX_LENGTH).astype(np.int64)
    ok = (magic == MAGIC) & ((lrec >> 29) == 0) & (offs + 8 + length <= file_size)
    ok &= length - IR_SIZE - 4 * flag > 0  # IRHeader + label array + a non-empty image
    val = np.where(flag > 0, f[:, 8], f[:, 3]).astype(np.float64)
    with np.errstate(invalid="ignore"):
        ok &= np.isfinite(val) & (val == np.floor(val)) & (val >= 0)
        ok &= val < (MAX_EXACT_LABEL if num_classes is None else min(num_classes, MAX_EXACT_LABEL))
    lab = np.where(ok, val, 0).astype(np.int64)
    return lab, ok


def scan_labels(rec_path: PathLike, offsets: np.ndarray, file_size: int, num_classes: Optional[int],
                progress: Optional[bool] = None, tick: Optional[Callable[[], None]] = None
                ) -> Tuple[np.ndarray, np.ndarray]:
    """(labels, ok) of the records at ``offsets`` (any order), read in byte order in
    pieces of <= ``SCAN_CHUNK_BYTES``; ``ok`` False marks records to re-check one by one.
    ``tick`` is called after every piece (the scan lock's progress mark)."""
    n = offsets.size
    labels = np.zeros(n, dtype=np.int64)
    ok = np.zeros(n, dtype=bool)
    if n == 0:
        return labels, ok
    sorted_already = n < 2 or bool(np.all(offsets[1:] > offsets[:-1]))
    order = None if sorted_already else np.argsort(offsets, kind="stable")
    so = offsets if order is None else offsets[order]
    if progress is None:
        progress = sys.stderr.isatty()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"scanning {Path(rec_path).name}", unit="rec", unit_scale=True)
    fd = os.open(rec_path, os.O_RDONLY)
    try:
        i = 0
        while i < n:
            j = int(np.searchsorted(so, so[i] + SCAN_CHUNK_BYTES, side="left"))
            j = min(max(j, i + 1), i + SCAN_CHUNK_RECORDS)
            lab, good = _scan_group(fd, so[i:j], file_size, num_classes)
            where = slice(i, j) if order is None else order[i:j]
            labels[where] = lab
            ok[where] = good
            if bar is not None:
                bar.update(j - i)
            if tick is not None:
                tick()
            i = j
    finally:
        os.close(fd)
        if bar is not None:
            bar.close()
    return labels, ok


def warn_if_identity_sorted(ds: FaceRecDataset, batch_size: int, shuffle_buffer: Optional[int]) -> None:
    """Warn when a local shuffle buffer cannot mix enough identities per batch (UNPG needs many)."""
    stats = ds.identity_order_stats()
    run = stats["mean_run"]
    if shuffle_buffer is None or run <= 1.5:
        return
    identities_in_buffer = shuffle_buffer / run
    if identities_in_buffer < 2 * batch_size:
        warnings.warn(
            f"{ds.rec_path} is stored sorted by identity (mean run {run:.1f} images); a shuffle "
            f"buffer of {shuffle_buffer} holds only ~{identities_in_buffer:.0f} identities, so "
            f"batches of {batch_size} see few identities and UNPG gets few negative pairs. "
            "Re-pack it in random order with `python -m data_tools shuffle`, raise the buffer, or use "
            "shuffle_mode='global' (random reads).",
            stacklevel=3,
        )
