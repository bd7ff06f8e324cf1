"""insightface face datasets on top of RecordIO: header record, identity records, labels.

Layout (docs/design.md §3): ``data_dir/train.rec``, ``train.idx``, ``property``
("num_classes,112,112"). Record 0 may be a header with flag > 0 whose labels
are ``(first_identity_key, end_key)``: images are keys ``1 .. label[0]-1``,
keys ``label[0] .. label[1]-1`` are identity records (labels = that identity's
[first, end) image keys) and never images. Without such a header every key is
an image. The physical order in the file may differ from key order.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np

from trainer.data.recordio import (
    IR_SIZE,
    IndexedRecordReader,
    RecordIOError,
    class_id,
    unpack,
    write_index,
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

    def __init__(self, data_dir: PathLike, rec_name: str = "train"):
        self.data_dir = Path(data_dir)
        rec = self.data_dir / f"{rec_name}.rec"
        idx = self.data_dir / f"{rec_name}.idx"
        if not rec.is_file():
            raise FileNotFoundError(f"RecordIO file not found: {rec}")
        if not idx.is_file():
            raise FileNotFoundError(
                f"RecordIO index not found: {idx} (rebuild it with `python -m data_tools validate "
                f"{self.data_dir} --write-index`)"
            )
        self.reader = IndexedRecordReader(rec, idx)
        prop = read_property(self.data_dir)
        self._property_classes = prop[0] if prop else None
        self.header: Optional[Tuple[int, int]] = None
        self.missing_images = 0
        keys = np.asarray(sorted(self.reader.keys), dtype=np.int64)
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
                    "the header lists are not in the index; they are skipped"
                )
        else:
            self.image_keys = keys
        self.labels: Optional[np.ndarray] = None

    # ------------------------------------------------------------------ basics
    @property
    def rec_path(self) -> Path:
        return self.reader.rec_path

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
    def _cache_dir(self) -> Path:
        st_r, st_i = self.reader.rec_path.stat(), self.reader.idx_path.stat()
        tag = (f"{self.reader.rec_path.resolve()}|{st_r.st_ino}|{st_r.st_size}|{st_r.st_mtime_ns}|"
               f"{st_i.st_ino}|{st_i.st_size}|{st_i.st_mtime_ns}")
        digest = hashlib.sha1(tag.encode()).hexdigest()[:16]
        base = Path(os.environ.get("UNPG_DATA_CACHE", Path(tempfile.gettempdir()) / "unpg-data-cache"))
        return base / f"{self.reader.rec_path.stem}-{digest}"

    def scan(self, progress: bool = False) -> np.ndarray:
        """Labels of every image record (int64, aligned with ``image_keys``).

        Reads only the record headers (plus the IRHeader), checks framing, that
        the image is not empty and the label is an exact integer in range.
        Cached on disk keyed by the files' size and mtime.
        """
        if self.labels is not None:
            return self.labels
        cache = self._cache_dir() / "labels.npy"
        if cache.is_file():
            try:
                lab = np.load(cache)
                if lab.shape == self.image_keys.shape:
                    self.labels = lab
                    return lab
            except Exception:
                pass
        labels = np.empty(self.image_keys.size, dtype=np.int64)
        it = self.image_keys
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc=f"scanning {self.rec_path.name}", unit="rec")
        nc = self._property_classes
        for i, key in enumerate(it):
            key = int(key)
            where = self.reader.where(key)
            head, length = self.reader.read_head(key, IR_SIZE + 64)
            h, rest = unpack(head, where)
            labels[i] = class_id(h, where, nc)
            if length - IR_SIZE - 4 * max(h.flag, 0) <= 0:
                raise RecordIOError(f"{where}: empty image (record holds a header only)")
        self.labels = labels
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            from trainer.io.atomic import atomic_open

            with atomic_open(cache, "wb") as f:
                np.save(f, labels)
        except OSError:
            pass
        return labels

    def image_index_path(self) -> Path:
        """Path of an index listing only image records (what DALI must be fed).

        DALI's mxnet reader reads every offset in the .idx, ignoring keys; the
        header and identity records would come out as 0-byte images.
        """
        p = self._cache_dir() / "images.idx"
        if not p.is_file():
            p.parent.mkdir(parents=True, exist_ok=True)
            write_index(p, [(int(k), self.reader.offsets[int(k)]) for k in self.image_keys])
        return p

    def identity_order_stats(self) -> Dict[str, float]:
        """How identity-sorted the physical file is: mean run length of equal labels in byte order."""
        labels = self.scan()
        if labels.size == 0:
            return {"mean_run": 0.0, "images_per_identity": 0.0}
        offs = np.asarray([self.reader.offsets[int(k)] for k in self.image_keys])
        lab = labels[np.argsort(offs, kind="stable")]
        runs = 1 + int(np.count_nonzero(lab[1:] != lab[:-1]))
        return {
            "mean_run": lab.size / runs,
            "images_per_identity": lab.size / max(1, np.unique(lab).size),
        }


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
            "Re-pack it in random order with `python -m data_tools shuffle` or raise the buffer.",
            stacklevel=3,
        )
