"""shuffle: re-pack a RecordIO dataset with its image records in random physical order.

Keys and record bytes are kept as they are (header, identity records, labels),
only the byte order of image records changes, so DALI's local shuffle buffer
(which follows byte order) sees many identities. Writes OUT/train.rec,
train.idx and copies property; OUT may not be the input folder.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from trainer.data.face_rec import FaceRecDataset
from trainer.data.recordio import IndexedRecordWriter


def shuffle_rec(data_dir, out_dir, seed: int = 0, progress: bool = True) -> dict:
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if out_dir.resolve() == data_dir.resolve():
        raise ValueError("shuffle: the output folder must differ from the input folder")
    ds = FaceRecDataset(data_dir)
    r = ds.reader
    image_keys = ds.image_keys
    perm = np.random.default_rng(seed).permutation(image_keys.size)
    other = sorted(set(r.keys) - set(image_keys.tolist()))
    head = [k for k in other if k == 0]
    tail = [k for k in other if k != 0]
    with IndexedRecordWriter(out_dir / "train.rec", out_dir / "train.idx") as w:
        for k in head:
            w.write(k, r.read(k))
        for i in tqdm(perm.tolist(), desc="shuffle", unit="rec", disable=not progress):
            k = int(image_keys[i])
            w.write(k, r.read(k))
        for k in tail:
            w.write(k, r.read(k))
    for extra in ("property", "identities.txt"):
        if (data_dir / extra).is_file():
            shutil.copyfile(data_dir / extra, out_dir / extra)
    return {"images": int(image_keys.size), "other_records": len(other)}


def add_parser(sub) -> None:
    p = sub.add_parser("shuffle", help="re-pack image records in random order", description=__doc__)
    p.add_argument("data", help="input folder (train.rec, train.idx, property)")
    p.add_argument("out", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_main)


def _main(a) -> int:
    s = shuffle_rec(a.data, a.out, a.seed)
    print(f"shuffle: {s['images']} image records re-packed in random order "
          f"(+{s['other_records']} header/identity records) -> {a.out}")
    return 0
