"""data_tools: synth, folder2rec, rec2folder, shuffle, validate, make_bin, CLI."""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import simplejpeg

from data_tools.cli import main
from data_tools.synth import generate_dataset
from trainer.data.face_rec import FaceRecDataset
from trainer.data.recordio import IndexedRecordReader
from trainer.io.binfile import read_bin

ROOT = Path(__file__).resolve().parents[2]


def sha(p):
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def test_synth_deterministic_noise_and_val(tmp_path):
    a = generate_dataset(tmp_path / "a", 10, 5, seed=7, label_noise=0.2, val_identities=3, val_pairs=6, workers=2)
    b = generate_dataset(tmp_path / "b", 10, 5, seed=7, label_noise=0.2, val_identities=3, val_pairs=6, workers=1)
    generate_dataset(tmp_path / "c", 10, 5, seed=8, label_noise=0.2, val_identities=3, val_pairs=6, workers=1)
    for f in ("train.rec", "train.idx", "property", "val.bin"):
        assert sha(tmp_path / "a" / f) == sha(tmp_path / "b" / f), f  # independent of worker count
    assert sha(tmp_path / "a" / "train.rec") != sha(tmp_path / "c" / "train.rec")
    assert a["noisy_images"] == b["noisy_images"] == 10
    imgs, same = read_bin(tmp_path / "a" / "val.bin")
    assert len(imgs) == 12 and sum(same) == 3 and len(same) == 6
    assert simplejpeg.decode_jpeg(imgs[0]).shape == (112, 112, 3)


def _pixel_stats(data_dir):
    """Central-crop raw pixels: (within/between identity distance ratio, nearest-neighbour accuracy)."""
    ds = FaceRecDataset(data_dir)
    lab = ds.scan()
    x = np.stack([simplejpeg.decode_jpeg(ds.read_image(int(k))[1])[28:84:2, 28:84:2].astype(np.float32).ravel()
                  for k in ds.image_keys])
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    same = lab[:, None] == lab[None]
    np.fill_diagonal(same, False)
    ratio = d[same].mean() / d[lab[:, None] != lab[None]].mean()
    np.fill_diagonal(d, np.inf)
    return float(ratio), float((lab[d.argmin(1)] == lab).mean())


def test_synth_identity_is_structured_but_not_trivial(tmp_path):
    generate_dataset(tmp_path, 20, 8, seed=0, workers=1)
    ratio, acc = _pixel_stats(tmp_path)
    # same identity is closer than different ones, yet raw-pixel nearest neighbour
    # is far from solving it (seed 0: ratio 0.69, accuracy 0.45, chance 0.05)
    assert ratio < 0.85 and 0.15 < acc < 0.8, (ratio, acc)


def test_label_noise_relabels_exactly_the_stated_share(tmp_path):
    generate_dataset(tmp_path / "n", 10, 10, seed=1, label_noise=0.3, workers=1)
    generate_dataset(tmp_path / "c", 10, 10, seed=1, label_noise=0.0, workers=1)
    # same images, by content: compare label of each image bytes
    def by_img(d):
        ds = FaceRecDataset(d)
        return {ds.read_image(int(k))[1]: ds.read_image(int(k))[0] for k in ds.image_keys}
    n, c = by_img(tmp_path / "n"), by_img(tmp_path / "c")
    assert set(n) == set(c)
    assert sum(n[k] != c[k] for k in n) == 30


def test_folder2rec_rec2folder_round_trip(tmp_path, synth_dir):
    assert main(["rec2folder", str(synth_dir), str(tmp_path / "f")]) == 0
    assert sorted(os.listdir(tmp_path / "f")) == sorted(str(i) for i in range(16))
    # a PNG and a wrong-size image get re-encoded
    from PIL import Image

    Image.new("RGB", (120, 100), (10, 200, 30)).save(tmp_path / "f" / "3" / "extra.png")
    assert main(["folder2rec", str(tmp_path / "f"), str(tmp_path / "r"), "--workers", "1"]) == 0
    src = FaceRecDataset(synth_dir)
    out = FaceRecDataset(tmp_path / "r")
    assert out.num_images == 97 and out.num_classes == 16
    copied = {out.read_image(int(k))[1] for k in out.image_keys}
    for k in src.image_keys[:20]:
        assert src.read_image(int(k))[1] in copied  # JPEGs copied byte for byte
    names = (tmp_path / "r" / "identities.txt").read_text().splitlines()
    assert len(names) == 16
    assert main(["validate", str(tmp_path / "r")]) == 0


def test_folder2rec_refuses_outside_links_and_control_characters_reports_empty(tmp_path, synth_dir, capsys):
    assert main(["rec2folder", str(synth_dir), str(tmp_path / "f")]) == 0
    src, outside = tmp_path / "f", tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes((src / "3" / sorted(os.listdir(src / "3"))[0]).read_bytes())
    (src / "3" / "link.jpg").symlink_to(outside / "secret.jpg")
    assert main(["folder2rec", str(src), str(tmp_path / "r"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "link.jpg" in err and "outside the source folder" in err and "--follow-external-links" in err
    assert not (tmp_path / "r" / "train.rec").exists()
    os.symlink(outside, src / "ext_identity")  # a whole identity folder outside
    (src / "3" / "link.jpg").unlink()
    assert main(["folder2rec", str(src), str(tmp_path / "r"), "--workers", "1"]) == 2
    assert "ext_identity" in capsys.readouterr().err
    assert main(["folder2rec", str(src), str(tmp_path / "r"), "--workers", "1", "--follow-external-links"]) == 0
    assert FaceRecDataset(tmp_path / "r").num_classes == 17
    (src / "ext_identity").unlink()
    # a link inside the source is fine
    (src / "3" / "inner.jpg").symlink_to(src / "4" / sorted(os.listdir(src / "4"))[0])
    (src / "bad\nname").mkdir()
    assert main(["folder2rec", str(src), str(tmp_path / "r2"), "--workers", "1"]) == 2
    assert "control character" in capsys.readouterr().err
    (src / "bad\nname").rmdir()
    (src / "zz_empty").mkdir()
    assert main(["folder2rec", str(src), str(tmp_path / "r3"), "--workers", "1"]) == 0
    assert "1 identity folder(s) without images were skipped" in capsys.readouterr().err
    out = FaceRecDataset(tmp_path / "r3")
    assert out.num_classes == 16 and out.num_images == 97
    assert "zz_empty" not in (tmp_path / "r3" / "identities.txt").read_text()


def test_shuffle_keeps_records_changes_order(tmp_path, synth_dir):
    generate_dataset(tmp_path / "s", 6, 5, seed=2, workers=1, shuffle=False)
    assert main(["shuffle", str(tmp_path / "s"), str(tmp_path / "t"), "--seed", "1"]) == 0
    a, b = IndexedRecordReader(tmp_path / "s" / "train.rec"), IndexedRecordReader(tmp_path / "t" / "train.rec")
    assert sorted(a.keys) == sorted(b.keys) and all(a.read(k) == b.read(k) for k in a.keys)
    phys = lambda r: sorted(r.keys, key=r.offsets.get)  # noqa: E731
    assert phys(a) == sorted(a.keys) and phys(b) != phys(a)
    sa = FaceRecDataset(tmp_path / "s").identity_order_stats()["mean_run"]
    sb = FaceRecDataset(tmp_path / "t").identity_order_stats()["mean_run"]
    assert sa == 5 and sb < 2


def test_identity_sorted_file_warns_for_dali_buffer(tmp_path):
    from trainer.data.face_rec import warn_if_identity_sorted

    generate_dataset(tmp_path, 8, 10, seed=2, workers=1, shuffle=False)
    with pytest.warns(UserWarning, match="sorted by identity"):
        warn_if_identity_sorted(FaceRecDataset(tmp_path), batch_size=16, shuffle_buffer=64)


def _run_validate(d, *extra):
    from data_tools.validate import validate

    return validate(d, progress=False, workers=1, **dict(extra))


@pytest.mark.parametrize("damage,expect", [
    ("truncate", "truncated"),
    ("magic", "bad magic"),
    ("idx_past_end", "past the end"),
    ("idx_mid", "not the start of a record"),
    ("idx_line", "line 3 is not"),
    ("label", "out of range"),
    ("empty", "empty image"),
    ("undecodable", "undecodable"),
    ("identity", "identity"),
])
def test_validate_reports_each_problem(synth_copy, damage, expect):
    from trainer.data.irheader import IRHeader, pack, unpack
    from trainer.data.recordio import IndexedRecordWriter

    rec, idx = synth_copy / "train.rec", synth_copy / "train.idx"
    r = IndexedRecordReader(rec)
    key = 9
    off = r.offsets[key]
    if damage == "truncate":
        rec.write_bytes(rec.read_bytes()[:-20])
    elif damage == "magic":
        b = bytearray(rec.read_bytes())
        b[off:off + 4] = b"abcd"
        rec.write_bytes(bytes(b))
    elif damage == "idx_past_end":
        idx.write_text(idx.read_text().replace(f"{key}\t{off}\n", f"{key}\t{rec.stat().st_size + 400}\n"))
    elif damage == "idx_mid":
        idx.write_text(idx.read_text().replace(f"{key}\t{off}\n", f"{key}\t{off + 40}\n"))
    elif damage == "idx_line":
        lines = idx.read_text().splitlines()
        lines[2] = "3\tx12"
        idx.write_text("\n".join(lines) + "\n")
    else:
        recs = {k: r.read(k) for k in r.keys}
        order = sorted(r.keys, key=r.offsets.get)
        h, img = unpack(recs[key])
        if damage == "label":
            recs[key] = pack(IRHeader(0, 99.0), img)
        elif damage == "empty":
            recs[key] = pack(IRHeader(0, h.label), b"")
        elif damage == "undecodable":
            recs[key] = pack(IRHeader(0, h.label), img[:30] + b"\0" * 40)
        elif damage == "identity":
            recs[key] = pack(IRHeader(0, float((int(h.label) + 1) % 16)), img)
        with IndexedRecordWriter(rec) as w:
            for k in order:
                w.write(k, recs[k])
    rep = _run_validate(synth_copy)
    text = rep.text()
    assert not rep.ok and expect in text, text
    assert "train." in text
    # the CLI exits non-zero on it
    p = subprocess.run(
        [sys.executable, "-m", "data_tools", "validate", str(synth_copy), "--workers", "1"],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))),
        capture_output=True,
        text=True,
    )
    assert p.returncode == 1 and "FAILED" in p.stdout


def test_validate_missing_files(tmp_path):
    rep = _run_validate(tmp_path)
    assert not rep.ok and "train.rec: file not found" in rep.text()


def test_make_bin(tmp_path, synth_dir):
    main(["rec2folder", str(synth_dir), str(tmp_path / "f")])
    a = sorted((tmp_path / "f" / "0").iterdir())
    b = sorted((tmp_path / "f" / "1").iterdir())
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(f"0/{a[0].name} 0/{a[1].name} 1\n0/{a[2].name} 1/{b[0].name} 0\n")
    assert main(["make_bin", str(pairs), str(tmp_path / "p.bin"), "--root", str(tmp_path / "f")]) == 0
    imgs, same = read_bin(tmp_path / "p.bin")
    assert same == [True, False] and imgs[0] == a[0].read_bytes() and imgs[3] == b[0].read_bytes()
    pairs.write_text("only_one_path 1\n")
    assert main(["make_bin", str(pairs), str(tmp_path / "q.bin")]) == 2


@pytest.mark.parametrize("cmd", ["folder2rec", "rec2folder", "shuffle", "validate", "make_bin", "synth"])
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0 and "usage" in capsys.readouterr().out


def test_synth_cli(tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_tools",
            "synth",
            "--out",
            str(tmp_path),
            "--identities",
            "5",
            "--images-per-identity",
            "4",
            "--seed",
            "1",
            "--label-noise",
            "0.1",
            "--val-identities",
            "3",
            "--val-pairs",
            "4",
        ],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))),
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    assert (
        "20 images of 5 identities (2 with noisy labels)" in p.stdout and "4 pairs (2 genuine, 2 impostor)" in p.stdout
    )
    assert {"train.rec", "train.idx", "property", "val.bin"} <= set(os.listdir(tmp_path))


def test_folder2rec_refuses_line_separators_duplicate_links_and_skips_hidden(tmp_path, synth_dir, capsys):
    assert main(["rec2folder", str(synth_dir), str(tmp_path / "f")]) == 0
    src = tmp_path / "f"
    # U+2028 splits the line for str.splitlines() but not for bytes readers: refused
    (src / "bad\u2028name").mkdir()
    (src / "bad\u2028name" / "a.jpg").write_bytes((src / "3" / sorted(os.listdir(src / "3"))[0]).read_bytes())
    capsys.readouterr()
    assert main(["folder2rec", str(src), str(tmp_path / "r1"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "line separator" in err and "\\u2028" in err
    shutil.rmtree(src / "bad\u2028name")
    # a link to another identity folder inside the source: the same images as two classes
    os.symlink(src / "4", src / "4_again")
    assert main(["folder2rec", str(src), str(tmp_path / "r2"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "4_again" in err and "identity '4'" in err and "two classes" in err
    (src / "4_again").unlink()
    # hidden folders and files are no identity and no image
    shutil.copytree(src / "5", src / ".ipynb_checkpoints")
    (src / "5" / ".hidden.jpg").write_bytes((src / "5" / sorted(os.listdir(src / "5"))[0]).read_bytes())
    assert main(["folder2rec", str(src), str(tmp_path / "r3"), "--workers", "1"]) == 0
    assert "'.ipynb_checkpoints'" in capsys.readouterr().err
    out = FaceRecDataset(tmp_path / "r3")
    assert out.num_classes == 16 and out.num_images == 96
    assert ".ipynb" not in (tmp_path / "r3" / "identities.txt").read_text()
