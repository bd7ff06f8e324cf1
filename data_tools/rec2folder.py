"""rec2folder: unpack a RecordIO face dataset into ``OUT/<label>/<key>.<ext>`` (raw image bytes)."""
from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from trainer.data.face_rec import FaceRecDataset


def _ext(data: bytes) -> str:
    if data[:2] == b"\xff\xd8":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return "bin"


def rec2folder(data_dir, out_dir, progress: bool = True) -> dict:
    ds = FaceRecDataset(data_dir)
    out = Path(out_dir)
    n = 0
    labels = set()
    for key in tqdm(ds.image_keys.tolist(), desc="rec2folder", unit="img", disable=not progress):
        lab, data = ds.read_image(int(key))
        d = out / str(lab)
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{key}.{_ext(data)}").write_bytes(data)
        n += 1
        labels.add(lab)
    return {"images": n, "identities": len(labels)}


def add_parser(sub) -> None:
    p = sub.add_parser("rec2folder", help="unpack train.rec into identity sub-folders", description=__doc__)
    p.add_argument("data", help="folder with train.rec, train.idx (property optional)")
    p.add_argument("out", help="output folder")
    p.set_defaults(func=lambda a: _main(a))


def _main(a) -> int:
    s = rec2folder(a.data, a.out)
    print(f"rec2folder: {s['images']} images of {s['identities']} identities -> {a.out}")
    return 0
