"""validate: walk every record of a RecordIO face dataset and report every problem.

Checks: framing (magic, lengths, split-record flags, truncation) by a
sequential walk of the .rec; every .idx line (syntax, duplicate keys, offsets
that are past the end or not the start of a record); the insightface header
and identity records (ranges, and that each image's label equals its
identity); labels (exact integers in [0, num_classes)); images (not empty,
decodable, of --size). Prints a report; exit status 1 when anything is wrong.

--write-index rewrites train.idx without the bad image records (the original
is kept as train.idx.orig), so both loaders skip them (counted in a warning).
The decode check runs on all cores (--workers) with a progress bar and an ETA;
it records a verdict for every chunk of the file whose images all decode, keyed
by the chunk's content (trainer.data.decode_check), so the DALI loader only
re-hashes a validated dataset instead of decoding it (the recommended
preparation step for a large dataset, docs/data.md).
"""
from __future__ import annotations

import argparse
import mmap
import multiprocessing as mp
import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from trainer.data.face_rec import read_property
from trainer.data.irheader import class_id, unpack
from trainer.data.recordio import MAGIC, RecordIOError, parse_record_at, read_index, write_index
from trainer.io.images import ImageDecodeError, decode_rgb

_MAGIC = MAGIC.to_bytes(4, "little")


class Report:
    def __init__(self):
        self.problems: Dict[str, List[str]] = defaultdict(list)
        self.info: List[str] = []

    def add(self, kind: str, msg: str) -> None:
        self.problems[kind].append(msg)

    @property
    def ok(self) -> bool:
        return not self.problems

    def count(self) -> int:
        return sum(len(v) for v in self.problems.values())

    def text(self, limit: int = 10) -> str:
        out = list(self.info)
        for kind, msgs in sorted(self.problems.items()):
            out.append(f"PROBLEM {kind}: {len(msgs)}")
            out += [f"  {m}" for m in msgs[:limit]]
            if len(msgs) > limit:
                out.append(f"  ... {len(msgs) - limit} more")
        out.append("OK: no problems found" if self.ok else f"FAILED: {self.count()} problem(s)")
        return "\n".join(out)


def _walk(rec: Path, data, rep: Report) -> Dict[int, int]:
    """Record starts -> end offsets; after a framing error resync at the next aligned magic."""
    size = len(data)
    reader = lambda off, n: bytes(data[off:off + n])  # noqa: E731
    starts: Dict[int, int] = {}
    pos = 0
    while pos < size:
        try:
            _, nxt = parse_record_at(reader, pos, size, f"{rec} (record at byte {pos})")
            starts[pos] = nxt
            pos = nxt
        except RecordIOError as e:
            rep.add("framing", str(e))
            p = data.find(_MAGIC, pos + 1)
            while p != -1 and p % 4:
                p = data.find(_MAGIC, p + 1)
            if p == -1:
                break
            pos = p
    return starts


def _parse_index(idx: Path, rep: Report) -> List[Tuple[int, int]]:
    keys, offsets = read_index(idx, on_error=lambda msg: rep.add("index", msg))
    return [(k, offsets[k]) for k in keys]


_SIZE = (112, 112)


def _decode_check(args) -> Optional[str]:
    key, img = args
    try:
        decode_rgb(img, "image", size=_SIZE)
    except ImageDecodeError as e:
        return str(e).split(": ", 1)[1]
    return None


def _open_dataset(data_dir: Path):
    """The dataset as the loaders open it (None when its index does not open)."""
    import warnings

    from trainer.data.face_rec import FaceRecDataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a cleaned index's "missing keys" note
        return FaceRecDataset(data_dir)


def validate(data_dir, decode: bool = True, write_clean_index: bool = False, size: int = 112,
             workers: Optional[int] = None, progress: bool = True) -> Report:
    global _SIZE
    _SIZE = (size, size)
    workers = max(1, workers or os.cpu_count() or 1)
    data_dir = Path(data_dir)
    rec, idx = data_dir / "train.rec", data_dir / "train.idx"
    rep = Report()
    for p in (rec, idx):
        if not p.is_file():
            rep.add("missing", f"{p}: file not found")
    if not rep.ok:
        return rep
    try:
        prop = read_property(data_dir)
    except RecordIOError as e:
        rep.add("property", str(e))
        prop = None
    if prop is None and not rep.problems.get("property"):
        rep.info.append(f"{data_dir / 'property'}: absent (num_classes taken from the labels)")
    num_classes = prop[0] if prop else None

    with open(rec, "rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
    size_b = len(data)
    if not size_b:
        rep.add("framing", f"{rec}: empty file")
    starts = _walk(rec, data, rep)
    rep.info.append(f"{rec}: {size_b} bytes, {len(starts)} records")
    reader = lambda off, n: bytes(data[off:off + n])  # noqa: E731

    items = _parse_index(idx, rep)
    rep.info.append(f"{idx}: {len(items)} entries")
    good: Dict[int, int] = {}
    for k, o in items:
        if o + 8 > size_b:
            rep.add("index", f"{idx}: key {k} points to byte {o}, past the end of {rec} ({size_b} bytes)")
        elif o not in starts:
            rep.add("index", f"{idx}: key {k} points to byte {o}, which is not the start of a record in {rec}")
        else:
            good[k] = o
    unindexed = len(set(starts) - set(good.values()))
    if unindexed:
        rep.info.append(f"{rec}: {unindexed} record(s) not listed in the index (ignored)")

    def payload(k: int) -> bytes:
        return parse_record_at(reader, good[k], size_b, f"{rec} (key {k} at byte {good[k]})")[0]

    header: Optional[Tuple[int, int]] = None
    if 0 in good:
        h, _ = unpack(payload(0), f"{rec} (key 0)")
        if h.flag > 0:
            lab = h.labels
            if lab.size >= 2 and 1 <= lab[0] <= lab[1]:
                header = (int(lab[0]), int(lab[1]))
                rep.info.append(f"insightface header: images 1..{header[0] - 1}, identity records "
                                f"{header[0]}..{header[1] - 1}")
            else:
                rep.add("header", f"{rec} (key 0): header labels {lab.tolist()} are not (first_identity_key, end_key)")
    if header:
        image_keys = [k for k in range(1, header[0])]
        missing = [k for k in image_keys if k not in good]
        if missing:
            rep.add(
                "index", f"{idx}: {len(missing)} image key(s) of the header missing or unusable, e.g. {missing[:5]}"
            )
        image_keys = [k for k in image_keys if k in good]
        id_keys = list(range(header[0], header[1]))
        if num_classes is not None and len(id_keys) != num_classes:
            rep.add(
                "property",
                f"{data_dir / 'property'}: num_classes {num_classes} but the header lists "
                f"{len(id_keys)} identity records",
            )
        if num_classes is None:
            num_classes = len(id_keys)
    else:
        image_keys = sorted(good)
        id_keys = []

    ds = None
    if decode:  # decoded by chunk of the file (decode_check), as the DALI loader checks
        try:
            ds = _open_dataset(data_dir)
        except (OSError, RecordIOError, ValueError) as e:
            rep.info.append(f"decode check per record, no verdict recorded (the index does not open: {e})")
    labels: Dict[int, int] = {}
    bad_images = set()
    to_decode = []
    for k in tqdm(image_keys, desc="validate labels", unit="rec", disable=not progress):
        where = f"{rec} (key {k} at byte {good[k]})"
        try:
            h, img = unpack(payload(k), where)
            labels[k] = class_id(h, where, num_classes)
            if not img:
                raise RecordIOError(f"{where}: empty image (record holds a header only)")
        except RecordIOError as e:
            kind = "label" if "label" in str(e) else "image"
            rep.add(kind, str(e))
            bad_images.add(k)
            continue
        if decode and ds is None:
            to_decode.append((k, img))
            if len(to_decode) >= 4096:
                _decode_batch(to_decode, rec, good, rep, bad_images, workers, progress)
                to_decode = []
    if decode and to_decode:
        _decode_batch(to_decode, rec, good, rep, bad_images, workers, progress)
    if ds is not None:
        verdict = _decode_chunks(ds, (size, size), workers, progress, rep, bad_images)

    # identity records: ranges and label consistency
    for c, k in enumerate(id_keys):
        if k not in good:
            rep.add("identity", f"{idx}: identity record key {k} missing")
            continue
        where = f"{rec} (identity key {k})"
        try:
            h, _ = unpack(payload(k), where)
        except RecordIOError as e:
            rep.add("identity", str(e))
            continue
        lab = h.labels
        if lab.size < 2:
            rep.add("identity", f"{where}: expected [first, end) image keys, got {lab.tolist()}")
            continue
        a, b = int(lab[0]), int(lab[1])
        wrong = [j for j in range(a, b) if j in labels and labels[j] != c]
        if wrong:
            rep.add("identity", f"{where}: identity {c} covers keys [{a}, {b}) but key {wrong[0]} has "
                                f"label {labels[wrong[0]]} ({len(wrong)} such)")
    if labels:
        vals = np.fromiter(labels.values(), np.int64)
        rep.info.append(f"labels: {len(labels)} valid images, {np.unique(vals).size} identities, "
                        f"range [{vals.min()}, {vals.max()}]")
    rep.info.append(f"bad image records: {len(bad_images)}")

    if write_clean_index:
        keep = [(k, good[k]) for k, _ in items if k in good and k not in bad_images]
        if not (idx.with_suffix(".idx.orig")).exists():
            shutil.copyfile(idx, idx.with_suffix(".idx.orig"))
        write_index(idx, keep)
        rep.info.append(f"wrote clean index {idx} ({len(keep)} entries, {len(items) - len(keep)} dropped; "
                        f"original kept as {idx.with_suffix('.idx.orig')})")
    if ds is not None and write_clean_index:  # chunks that lost records have new keys
        try:
            verdict = _decode_chunks(_open_dataset(data_dir), (size, size), workers, progress, rep, bad_images)
        except (OSError, RecordIOError, ValueError) as e:
            verdict = f"not recorded for the cleaned index: {e}"
    if ds is not None:
        rep.info.append(f"decode verdict recorded: {verdict}")
    return rep


def _decode_chunks(ds, size, workers, progress, rep: Report, bad_images) -> str:
    """Decode every chunk of ``ds`` (``workers`` processes), add the bad images to ``rep``;
    the chunks whose images all decode get their verdict. Returns a summary."""
    import time

    from trainer.data.decode_check import ChunkVerdicts, validate_chunks

    t = time.perf_counter()
    bad, decoded, ok = validate_chunks(ds, size, workers, progress)
    dt = time.perf_counter() - t
    for k, err in bad:
        if k not in bad_images:
            rep.add("image", err)
            bad_images.add(k)
    v = ChunkVerdicts(ds, size)
    n = v.all_chunks().size
    v.close()
    return (f"{ok} of {n} chunks of {v.chunk_bytes >> 10} KiB ({v.store}); {decoded} images decoded in "
            f"{dt:.1f} s on {workers} processes ({decoded / max(dt, 1e-9):,.0f} images/s)")


def _decode_batch(batch, rec, good, rep, bad_images, workers, progress) -> None:
    if workers > 1 and len(batch) > 256:
        with mp.get_context("fork").Pool(workers) as pool:
            results = pool.map(_decode_check, batch, chunksize=64)
    else:
        results = [_decode_check(x) for x in batch]
    for (k, _), err in zip(batch, results):
        if err:
            rep.add("image", f"{rec} (key {k} at byte {good[k]}): {err}")
            bad_images.add(k)


def add_parser(sub) -> None:
    p = sub.add_parser("validate", help="check every record; exit 1 on problems", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="folder with train.rec, train.idx, property")
    p.add_argument("--no-decode", action="store_true", help="skip decoding images (framing and labels only)")
    p.add_argument("--write-index", action="store_true", help="rewrite train.idx without bad image records")
    p.add_argument("--size", type=int, default=112, help="expected image side length")
    p.add_argument("--workers", type=int, default=None, help="decode processes (default: all cores)")
    p.set_defaults(func=_main)


def _main(a) -> int:
    rep = validate(a.data, decode=not a.no_decode, write_clean_index=a.write_index, size=a.size, workers=a.workers)
    print(rep.text())
    return 0 if rep.ok else 1
