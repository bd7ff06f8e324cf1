"""folder2rec: identity sub-folders of aligned face crops -> train.rec, train.idx, property.

SRC/<identity>/<image>.{jpg,jpeg,png,bmp,webp}; identities are numbered in
sorted folder-name order (written to OUT/identities.txt). Output uses
insightface's layout (header record 0, images, identity records) and is written
atomically (temporary files renamed at the end). JPEGs of the right size are
copied byte for byte unless --reencode; anything else is decoded, resized to
--size if needed and encoded as JPEG (--quality). Image records are stored
in random physical order unless --sorted (UNPG wants many identities per
batch and DALI's shuffle buffer follows byte order).

Refused: symbolic links (identity folders or images) that point outside SRC
(--follow-external-links includes them); two identity folders that are the same
folder (a link to another identity inside SRC: its images would train as two
classes); identity names with a character that ends a line for some reader
(control characters, U+2028/U+2029: identities.txt is one ``id<TAB>name`` per
line). Hidden entries (``.ipynb_checkpoints``, ``.DS_Store``, ``._x.jpg``) are no
identity and no image: skipped and listed in the report, as are identity
folders without images (no class id).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import unicodedata
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image

from data_tools.layout import write_face_rec
from trainer.io.atomic import atomic_open
from trainer.io.images import decode_rgb, encode_jpeg, is_jpeg, jpeg_size

EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class SourceError(ValueError):
    """A source folder entry folder2rec refuses (named in the message)."""


def _inside(p: Path, root: Path) -> bool:
    try:
        p.resolve().relative_to(root)
        return True
    except ValueError:
        return False


def _line_breaking(name: str) -> List[str]:
    """Characters of ``name`` that some reader takes as a line end or control (Cc, Zl, Zp)."""
    return [c for c in name if unicodedata.category(c) in ("Cc", "Zl", "Zp")]


def list_folder(src, follow_external_links: bool = False, empty: Optional[List[str]] = None,
                hidden: Optional[List[str]] = None) -> Tuple[List[str], List[Path], np.ndarray]:
    """(identity names, image files, labels); identities without images are skipped and
    appended to ``empty``, hidden entries (name starting with '.') to ``hidden``, when given."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"source folder not found: {src}")
    root = src.resolve()

    def check_link(p: Path) -> None:
        if not follow_external_links and not _inside(p, root):
            raise SourceError(f"{p}: a symbolic link to {p.resolve()}, outside the source folder {src}; "
                              "pass --follow-external-links to include it")

    dirs = []
    for d in sorted(src.iterdir()):
        if d.name.startswith("."):
            if hidden is not None:
                hidden.append(d.name)
        elif d.is_dir():
            dirs.append(d)
    names: List[str] = []
    files: List[Path] = []
    labels: List[int] = []
    seen = {}
    for d in dirs:
        bad = _line_breaking(d.name)
        if bad:
            raise SourceError(f"{d!r}: identity folder name contains control character(s) or line separator(s) "
                              f"{bad!r} (identities.txt holds one name per line); rename the folder")
        check_link(d)
        real = d.resolve()
        if real in seen:
            raise SourceError(f"{d}: the same folder as identity {seen[real]!r} ({real}), through a symbolic "
                              "link: its images would train as two classes; remove the link")
        seen[real] = d.name
        imgs = sorted(p for p in d.iterdir()
                      if p.suffix.lower() in EXTS and not p.name.startswith(".") and p.is_file())
        for p in imgs:
            check_link(p)
        if not imgs:
            if empty is not None:
                empty.append(d.name)
            continue
        c = len(names)
        names.append(d.name)
        files += imgs
        labels += [c] * len(imgs)
    if not files:
        raise ValueError(f"{src}: no images in identity sub-folders")
    return names, files, np.asarray(labels, np.int64)


_OPTS = {}


def _encode(path: Path) -> bytes:
    size, quality, reencode = _OPTS["size"], _OPTS["quality"], _OPTS["reencode"]
    data = path.read_bytes()
    if is_jpeg(data) and not reencode and jpeg_size(data, str(path)) == size:
        return data
    img = decode_rgb(data, str(path), lenient=True)
    if img.shape[:2] != size:
        img = np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.Resampling.BILINEAR))
    return encode_jpeg(img, quality)


def _init(opts):
    _OPTS.update(opts)


def folder2rec(src, out, reencode: bool = False, quality: int = 95, size: int = 112,
               shuffle: bool = True, seed: int = 0, workers: int = 2, progress: bool = True,
               follow_external_links: bool = False) -> dict:
    empty: List[str] = []
    hidden: List[str] = []
    names, files, labels = list_folder(src, follow_external_links, empty, hidden)
    opts = {"size": (size, size), "quality": quality, "reencode": reencode}

    def payloads(src_idx):
        paths = [files[i] for i in src_idx]
        if workers <= 1:
            _init(opts)
            for p in paths:
                yield _encode(p)
            return
        with mp.get_context("fork").Pool(workers, _init, (opts,)) as pool:
            yield from pool.imap(_encode, paths, chunksize=16)

    s = write_face_rec(out, labels, len(names), payloads, shuffle_seed=(seed if shuffle else None),
                       progress=("folder2rec" if progress else None), image_size=(size, size))
    with atomic_open(Path(out) / "identities.txt", "wb") as f:
        f.write("".join(f"{i}\t{n}\n" for i, n in enumerate(names)).encode())
    return {**s, "empty_identities": empty, "hidden": hidden}


def add_parser(sub) -> None:
    p = sub.add_parser("folder2rec", help="identity sub-folders -> train.rec/train.idx/property",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="folder of identity sub-folders")
    p.add_argument("out", help="output folder")
    p.add_argument(
        "--reencode", action="store_true", help="re-encode every image (default: copy JPEGs of the right size)"
    )
    p.add_argument("--quality", type=int, default=95)
    p.add_argument("--size", type=int, default=112, help="output side length (non-matching images are resized)")
    p.add_argument("--sorted", action="store_true",
                   help="store image records in identity order like insightface (default: random physical "
                        "order, keys still grouped by identity, so DALI's local shuffle mixes identities)")
    p.add_argument("--follow-external-links", action="store_true",
                   help="include symbolic links that point outside SRC (refused by default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=_main)


def _main(a) -> int:
    try:
        s = folder2rec(a.src, a.out, a.reencode, a.quality, a.size, not a.sorted, a.seed, a.workers,
                       follow_external_links=a.follow_external_links)
    except SourceError as e:
        print(f"error: folder2rec: {e}", file=sys.stderr)
        return 2
    if s["empty_identities"]:
        shown = ", ".join(repr(n) for n in s["empty_identities"][:10])
        print(f"folder2rec: {len(s['empty_identities'])} identity folder(s) without images were skipped "
              f"(no class id): {shown}{' ...' if len(s['empty_identities']) > 10 else ''}", file=sys.stderr)
    if s["hidden"]:
        print(f"folder2rec: hidden entries skipped (no identity): {', '.join(map(repr, s['hidden'][:10]))}"
              f"{' ...' if len(s['hidden']) > 10 else ''}", file=sys.stderr)
    print(f"folder2rec: {s['images']} images of {s['identities']} identities "
          f"({s['image_bytes'] / 1e6:.1f} MB) -> {a.out}/train.rec, train.idx, property, identities.txt")
    return 0
