"""One verdict on a bad record: what ``data_tools validate`` rejects, the DALI loader refuses too.

DALI's JPEG decoders accept some corrupt files that ``validate`` and the torch loader
reject (bytes flipped in the entropy-coded data decode to a garbled image without an
error), so the default loader would train on them silently. The rule:

- Before its first epoch the DALI loader decodes every image record once with the
  decoder ``validate`` uses (:func:`trainer.io.images.decode_rgb` at the training size);
  rank r of R checks records r, r+R, ... . A record that fails stops the run with an
  error naming the file and key and the fix (``python -m data_tools validate DIR
  --write-index`` writes an index without the bad records; both loaders then skip them).
- The verdict is cached beside the label cache (keyed by the .rec/.idx identity, size
  and mtime; ``$UNPG_DATA_CACHE``), so the pass runs once per dataset version and node.
- ``data_tools validate`` (with decoding) writes the same verdict for the whole dataset
  when every remaining image decodes, so a validated dataset is not decoded again.

Cost: one decode of the dataset per node (about the time of one epoch of decoding,
spread over the ranks and ``data.num_threads`` threads), the first time only.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence, Tuple

from trainer.data.face_rec import FaceRecDataset
from trainer.data.recordio import RecordIOError
from trainer.io.images import ImageDecodeError, decode_rgb

log = logging.getLogger("trainer")

ALL_OK = "decoded-ok-all"   # written by data_tools validate: every indexed image decodes


class BadRecordError(RuntimeError):
    """An image record that ``data_tools validate`` would reject."""


def _marker(ds: FaceRecDataset, rank: int, world_size: int) -> Path:
    return ds._cache_dir() / f"decoded-ok-r{rank}of{world_size}"


def mark_all_decodable(ds: FaceRecDataset) -> Path:
    """Record that every image record of ``ds`` (as indexed now) decodes (``data_tools validate``)."""
    p = ds._cache_dir() / ALL_OK
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(f"{ds.image_keys.size} image records decode\n")
    return p


def ensure_decodable(ds: FaceRecDataset, rank: int = 0, world_size: int = 1, num_threads: int = 1,
                     size: Optional[Tuple[int, int]] = (112, 112)) -> int:
    """Decode this rank's share of the image records once (cached); raises
    :class:`BadRecordError` on the first bad one. Returns how many were decoded now."""
    cache = ds._cache_dir()
    if (cache / ALL_OK).is_file() or _marker(ds, rank, world_size).is_file():
        return 0
    keys: Sequence[int] = [int(k) for k in ds.image_keys[rank::world_size]]
    log.info("checking that the %d image records of this rank decode (once per dataset version; "
             "`python -m data_tools validate %s` does it for all ranks)", len(keys), ds.data_dir)

    def check(key: int) -> Optional[str]:
        try:
            _, img = ds.read_image(key)
            decode_rgb(img, f"{ds.rec_path} (key {key})", size=size)
        except (ImageDecodeError, RecordIOError) as e:
            return str(e)
        return None

    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        for err in pool.map(check, keys, chunksize=256):
            if err is not None:
                raise BadRecordError(
                    f"{err}. The DALI loader refuses records that `data_tools validate` rejects (its decoder "
                    f"would train on them silently): run `python -m data_tools validate {ds.data_dir} "
                    "--write-index` to list them all and write an index without them")
    try:
        m = _marker(ds, rank, world_size)
        m.parent.mkdir(parents=True, exist_ok=True)
        m.write_text(f"{len(keys)} image records decode\n")
    except OSError:
        pass
    return len(keys)


__all__ = ["ALL_OK", "BadRecordError", "ensure_decodable", "mark_all_decodable"]
