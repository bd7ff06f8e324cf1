"""make_bin: image pairs -> insightface verification ``.bin`` (read back with a restricted unpickler).

PAIRS is a text file, one pair a line: ``path_a path_b issame`` (issame 1/0 or
true/false; paths relative to --root). Images are stored as their file bytes
(JPEG/PNG), re-encoded to JPEG only with --reencode.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from trainer.io.binfile import read_bin, write_bin
from trainer.io.images import decode_rgb, encode_jpeg, is_jpeg


def parse_pairs(path) -> list:
    pairs = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        f = line.split()
        if len(f) != 3 or f[2].lower() not in ("0", "1", "true", "false"):
            raise ValueError(f"{path}: line {lineno}: expected 'path_a path_b issame', got {line[:80]!r}")
        pairs.append((f[0], f[1], f[2].lower() in ("1", "true")))
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


def _load(p: Path, reencode: bool) -> bytes:
    if not p.is_file():
        raise FileNotFoundError(f"pair image not found: {p}")
    data = p.read_bytes()
    if reencode or not is_jpeg(data):
        img = decode_rgb(data, str(p), lenient=True)  # checks it decodes
        if reencode:
            data = encode_jpeg(img, 95)
    return data


def make_bin(pairs_file, out, root=None, reencode: bool = False, progress: bool = True) -> dict:
    pairs = parse_pairs(pairs_file)
    root = Path(root) if root else Path(pairs_file).parent
    imgs, issame = [], []
    for a, b, same in tqdm(pairs, desc="make_bin", unit="pair", disable=not progress):
        imgs += [_load(root / a, reencode), _load(root / b, reencode)]
        issame.append(same)
    write_bin(out, imgs, issame)
    read_bin(out)  # round-trip check through the restricted reader
    return {"pairs": len(pairs), "genuine": int(sum(issame)), "impostor": int(len(issame) - sum(issame))}


def add_parser(sub) -> None:
    p = sub.add_parser("make_bin", help="pairs list -> verification .bin", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pairs", help="pairs text file")
    p.add_argument("out", help="output .bin")
    p.add_argument("--root", help="folder the pair paths are relative to (default: the pairs file's folder)")
    p.add_argument("--reencode", action="store_true", help="re-encode every image as JPEG quality 95")
    p.set_defaults(func=_main)


def _main(a) -> int:
    s = make_bin(a.pairs, a.out, a.root, a.reencode)
    print(f"make_bin: {s['pairs']} pairs ({s['genuine']} genuine, {s['impostor']} impostor) -> {a.out}")
    return 0
