"""insightface layout: header record 0, identity records, labels, bad records."""
import numpy as np
import pytest

from data_tools.layout import write_face_rec
from trainer.data.face_rec import FaceRecDataset, read_property
from trainer.data.irheader import IRHeader, pack, unpack
from trainer.data.node_cache import load_labels
from trainer.data.recordio import IndexedRecordReader, IndexedRecordWriter, RecordIOError
from trainer.data.torch_loader import decode_image


def test_synth_layout_header_and_identity_records(synth_dir):
    r = IndexedRecordReader(synth_dir / "train.rec")
    n, k = 16 * 6, 16
    h, rest = unpack(r.read(0))
    assert h.flag == 2 and h.labels.tolist() == [n + 1, n + 1 + k] and rest == b""
    assert sorted(r.keys) == list(range(n + 1 + k))
    assert read_property(synth_dir) == (16, 112, 112)
    ds = FaceRecDataset(synth_dir)
    assert ds.header == (n + 1, n + 1 + k)
    assert ds.image_keys.tolist() == list(range(1, n + 1))  # identity records never images
    labels = ds.scan()
    for c in range(k):  # identity record c lists exactly the keys labelled c
        hc, _ = unpack(r.read(n + 1 + c))
        a, b = hc.labels.astype(int).tolist()
        assert (labels[a - 1:b - 1] == c).all() and b - a == 6
    # physical order is shuffled (keys grouped by identity, bytes are not)
    offs = [r.offsets[k] for k in range(1, n + 1)]
    assert offs != sorted(offs)
    for key in (1, 50, n):
        lab, img = ds.read_image(key)
        assert lab == labels[key - 1] and decode_image(img, "x").shape == (112, 112, 3)


def test_plain_rec_without_header_uses_every_key(tmp_path):
    with IndexedRecordWriter(tmp_path / "train.rec") as w:
        for k in range(5):
            w.write(k, pack(IRHeader(0, float(k % 2)), b"\xff\xd8data"))
    ds = FaceRecDataset(tmp_path)
    assert ds.header is None and ds.image_keys.tolist() == list(range(5))
    assert ds.scan().tolist() == [0, 1, 0, 1, 0] and ds.num_classes == 2


def test_face2rec_flag2_labels(tmp_path):
    # insightface face2rec records: [label, aligned]
    with IndexedRecordWriter(tmp_path / "train.rec") as w:
        w.write(0, pack(IRHeader(2, np.array([3, 5], np.float32))))
        w.write(1, pack(IRHeader(0, [0.0, 1.0]), b"a"))
        w.write(2, pack(IRHeader(0, [1.0, 1.0]), b"b"))
        w.write(3, pack(IRHeader(0, [1, 2])))  # identity 0: image key 1
        w.write(4, pack(IRHeader(0, [2, 3])))  # identity 1: image key 2
    ds = FaceRecDataset(tmp_path)
    assert ds.image_keys.tolist() == [1, 2] and ds.scan().tolist() == [0, 1] and ds.num_classes == 2


def _bad_set(tmp_path, label=1.0, img=b"\xff\xd8x", nclass=2):
    labels = [0, 1, 1]
    imgs = [b"\xff\xd8a", b"\xff\xd8b", img]

    def payloads(src):
        return [imgs[i] for i in src]

    write_face_rec(tmp_path, labels, nclass, payloads)
    return tmp_path


def test_label_out_of_range_names_record(tmp_path):
    d = _bad_set(tmp_path)
    (d / "property").write_text("1,112,112")
    with pytest.raises(RecordIOError, match=r"train\.rec \(key 2 .*out of range \[0, 1\)"):
        FaceRecDataset(d).scan()


def test_empty_image_names_record(tmp_path):
    with IndexedRecordWriter(tmp_path / "train.rec") as w:
        w.write(0, pack(IRHeader(0, 0.0), b"\xff\xd8ok"))
        w.write(1, pack(IRHeader(0, 0.0), b""))
    with pytest.raises(RecordIOError, match=r"key 1 .*empty image"):
        FaceRecDataset(tmp_path).scan()


def test_missing_files_named(tmp_path, synth_copy):
    (synth_copy / "train.idx").unlink()
    with pytest.raises(FileNotFoundError, match="train.idx"):
        FaceRecDataset(synth_copy)
    with pytest.raises(FileNotFoundError, match="train.rec"):
        FaceRecDataset(tmp_path / "nowhere")


def test_bad_property(synth_copy):
    (synth_copy / "property").write_text("lots")
    with pytest.raises(RecordIOError, match="property"):
        FaceRecDataset(synth_copy)


def test_undecodable_image_names_record():
    with pytest.raises(RecordIOError, match="k.rec \\(key 4\\): undecodable"):
        decode_image(b"\xff\xd8\xff\xe0garbage", "k.rec (key 4)")


def test_image_index_lists_only_images(synth_dir):
    ds = FaceRecDataset(synth_dir)
    lines = ds.image_index_path().read_text().splitlines()
    assert sorted(int(line.split("\t")[0]) for line in lines) == ds.image_keys.tolist()


# --------------------------------------------------------------------------- vectorised scan, scan lock
from trainer.data.recordio import MAGIC  # noqa: E402

_MAGIC_BYTES = MAGIC.to_bytes(4, "little")


def _mixed_rec(d, bad=None):
    """Plain rec, keys written in reverse byte order: scalar labels, label arrays (flag 2 and 20),
    split records (magic inside the image and inside the IRHeader id). ``bad``: {key: payload}."""
    payloads = {}
    for k in range(40):
        lab = float(k % 7)
        img = b"\xff\xd8" + bytes([k]) * (3 + k % 5)
        if k % 5 == 1:
            p = pack(IRHeader(0, [lab, 1.0]), img)
        elif k % 5 == 2:
            p = pack(IRHeader(0, [lab] + [0.5] * 19), img)
        elif k % 5 == 3:
            p = pack(IRHeader(0, lab), b"\xff\xd8\x00\x00" + _MAGIC_BYTES + img)  # split (cflag 1/3)
        elif k % 5 == 4:
            p = pack(IRHeader(0, lab, id=MAGIC), img)  # split inside the IRHeader
        else:
            p = pack(IRHeader(0, lab), img)
        payloads[k] = p
    payloads.update(bad or {})
    with IndexedRecordWriter(d / "train.rec") as w:
        for k in reversed(range(40)):
            w.write(k, payloads[k])
    return d


def test_vectorised_scan_equals_the_per_record_path(tmp_path):
    ds = FaceRecDataset(_mixed_rec(tmp_path))
    r = IndexedRecordReader(tmp_path / "train.rec")
    assert any((r._pread(r.offsets[k] + 4, 4)[3] >> 5) == 1 for k in (3, 4))  # really split on disk
    labels = ds.scan(progress=False)
    assert labels.tolist() == [k % 7 for k in range(40)]
    assert labels.tolist() == [ds._scan_one(k) for k in range(40)]


def test_vectorised_scan_on_synth_matches_per_record(synth_dir):
    ds = FaceRecDataset(synth_dir)
    lab = ds._scan_records(progress=False)
    assert lab.tolist() == [ds._scan_one(int(k)) for k in ds.image_keys]


@pytest.mark.parametrize("payload, message", [
    (pack(IRHeader(0, 9.0), b"\xff\xd8x"), r"key 11 .*out of range \[0, 7\)"),
    (pack(IRHeader(0, 2.5), b"\xff\xd8x"), r"key 11 .*not an integer"),
    (pack(IRHeader(0, [3.0, 1.0]), b""), r"key 11 .*empty image"),
    (b"short", r"key 11 .*shorter than the 24-byte IRHeader"),
])
def test_scan_names_the_first_bad_key_in_key_order(tmp_path, payload, message):
    # key 30 is bad too and comes first in byte order: the error still names key 11
    d = _mixed_rec(tmp_path, {11: payload, 30: pack(IRHeader(0, -1.0), b"\xff\xd8x")})
    (d / "property").write_text("7,112,112")
    with pytest.raises(RecordIOError, match=r"train\.rec \(" + message):
        FaceRecDataset(d).scan(progress=False)


_SCANNER = r'''
import pathlib, sys, time
import trainer.data.face_rec as fr
data, marker, go = sys.argv[1:4]
orig, calls = fr._scan_group, [0]
def hooked(*a, **k):
    calls[0] += 1
    if marker != "-" and calls[0] == 1:
        pathlib.Path(marker).write_text("scanning")
        while not pathlib.Path(go).exists():
            time.sleep(0.05)
    return orig(*a, **k)
fr._scan_group = hooked
lab = fr.FaceRecDataset(data).scan(progress=False)
print("RESULT", calls[0], int(lab.sum()), flush=True)
'''


def _spawn(args, tmp_path, name):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    err = open(tmp_path / f"{name}.err", "w")
    return subprocess.Popen([sys.executable, "-c", _SCANNER, *map(str, args)], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=err, text=True)


def _wait_for(pred, what, timeout=120):
    import time

    t = time.monotonic()
    while not pred():
        assert time.monotonic() - t < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("kill", [False, True])
def test_one_scan_per_node_and_a_killed_scanner_does_not_block(synth_dir, tmp_path, kill):
    """A scans and holds the lock (stopped inside its scan); B, started meanwhile, waits for it.
    A finishes: B loads A's cache without scanning. A is killed: B scans itself."""
    expected = int(FaceRecDataset(synth_dir)._scan_records(progress=False).sum())
    marker, go = tmp_path / "scanning", tmp_path / "go"
    a = _spawn([synth_dir, marker, go], tmp_path, "a")
    try:
        _wait_for(marker.exists, "the first scanner to start")
        b = _spawn([synth_dir, "-", "-"], tmp_path, "b")
        _wait_for(lambda: "waiting for the label scan by pid" in (tmp_path / "b.err").read_text(),
                  "the second process to wait on the lock")
        assert f"pid {a.pid} " in (tmp_path / "b.err").read_text()
        if kill:
            a.kill()
            a.wait(timeout=60)
        else:
            go.write_text("go")
            out_a, _ = a.communicate(timeout=120)
            assert a.returncode == 0 and out_a.split() == ["RESULT", "1", str(expected)]
        out_b, _ = b.communicate(timeout=120)
        assert b.returncode == 0, (tmp_path / "b.err").read_text()[-2000:]
        scans_b = 1 if kill else 0  # killed: B scans itself; else it loads A's cache
        assert out_b.split() == ["RESULT", str(scans_b), str(expected)]
    finally:
        for p in (a, locals().get("b")):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    ds = FaceRecDataset(synth_dir)
    assert load_labels(ds.cache_dir / "labels.npy", ds.image_keys.shape) is not None  # the cache is in place


def test_scan_lock_timeout_names_the_holder(synth_dir, tmp_path):
    from trainer.data.node_cache import ScanLock

    with ScanLock(tmp_path / "l.lock", "x.rec"):
        with pytest.raises(
            TimeoutError, match=r"l\.lock: the label scan lock of x\.rec is held by pid \d+ on .*gave up after 0.1 s"
        ):
            with ScanLock(tmp_path / "l.lock", "x.rec", timeout=0.1):
                pass
    with ScanLock(tmp_path / "l.lock", "x.rec", timeout=0.1):  # released on exit
        pass


def test_parsed_index_is_cached_and_follows_the_file(synth_copy):
    a = FaceRecDataset(synth_copy)
    b = FaceRecDataset(synth_copy)  # loads the cached arrays (memory-mapped)
    assert isinstance(b.reader.offsets.key_array, np.memmap)
    assert b.reader.keys == a.reader.keys and np.array_equal(b.image_offsets, a.image_offsets)
    assert b.read_image(5) == a.read_image(5)
    # rewriting train.idx (e.g. validate --write-index) changes the cache key: parsed again
    r = IndexedRecordReader(synth_copy / "train.rec")
    keep = [k for k in r.keys if k != 7]
    from trainer.data.recordio import write_index

    write_index(synth_copy / "train.idx", [(k, r.offsets[k]) for k in keep])
    with pytest.warns(UserWarning, match="1 of the 96 image keys"):
        c = FaceRecDataset(synth_copy)
    assert 7 not in c.reader and c.num_images == 95


def test_index_parse_waits_for_the_process_holding_the_lock(synth_copy, capfd):
    import threading
    import time

    from trainer.data.node_cache import ScanLock

    first = FaceRecDataset(synth_copy)
    d = first.cache_dir
    saved = {n: (d / n).read_bytes() for n in ("idx_keys.npy", "idx_offsets.npy")}
    for n in saved:
        (d / n).unlink()
    got = {}
    with ScanLock(d / "index.lock", "holder", task="index parse"):
        t = threading.Thread(target=lambda: got.setdefault("ds", FaceRecDataset(synth_copy)))
        t.start()
        err, t0 = "", time.monotonic()
        while "waiting for the index parse" not in err:
            assert time.monotonic() - t0 < 60, "the second opener did not wait on the index lock"
            err += capfd.readouterr().err
            time.sleep(0.05)
        for n, b in saved.items():  # what the lock holder would have written
            (d / n).write_bytes(b)
    t.join(60)
    ds = got["ds"]
    assert isinstance(ds.reader.offsets.key_array, np.memmap)  # loaded the holder's cache, no parse
    assert ds.reader.keys == first.reader.keys


def test_a_stopped_scan_lock_holder_fails_the_wait_naming_it(synth_dir, tmp_path):
    """A live but stopped scanner (SIGSTOP: a debugger, hung storage) holds labels.lock: the
    next process waits ``lock_timeout`` seconds without progress, then fails naming the lock
    file, the holder's pid, its state and how to clear it (before: it waited forever)."""
    import os
    import signal
    import time

    from trainer.data.node_cache import ScanLockTimeout

    marker, go = tmp_path / "scanning", tmp_path / "go"
    a = _spawn([synth_dir, marker, go], tmp_path, "a")
    try:
        _wait_for(marker.exists, "the first scanner to start")
        os.kill(a.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(ScanLockTimeout) as e:
            FaceRecDataset(synth_dir, lock_timeout=1.5).scan(progress=False)
        waited = time.monotonic() - t0
        msg = str(e.value)
        assert "labels.lock" in msg and f"pid {a.pid} on " in msg, msg
        assert "stopped (SIGSTOP" in msg and f"kill {a.pid}" in msg and "data.lock_timeout" in msg, msg
        assert waited >= 1.5  # it did wait the configured time first
    finally:
        os.kill(a.pid, signal.SIGKILL)
        a.wait()


def test_a_holder_making_progress_is_waited_for_past_the_timeout(tmp_path):
    """The timeout counts time without progress: a holder that keeps touching the lock file
    (a long scan on slow storage) is waited for however long it takes."""
    import threading
    import time

    from trainer.data.node_cache import ScanLock

    holder = ScanLock(tmp_path / "l.lock", "x.rec")
    holder.TOUCH_S = 0.05
    got = {}
    with holder:
        t = threading.Thread(target=lambda: got.setdefault("lock", ScanLock(tmp_path / "l.lock", "x.rec",
                                                                            timeout=0.6).__enter__()))
        t.start()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.0:  # 2 s of scanning with progress: > 3 x the timeout
            holder.progress()
            time.sleep(0.05)
        assert t.is_alive(), "the waiter gave up although the holder made progress"
    t.join(30)
    assert "lock" in got  # took the lock once the holder was done
    got["lock"].__exit__(None, None, None)


def test_the_index_lock_is_bounded_too(synth_copy):
    from trainer.data.node_cache import ScanLock, ScanLockTimeout

    first = FaceRecDataset(synth_copy)
    d = first.cache_dir
    for n in ("idx_keys.npy", "idx_offsets.npy"):
        (d / n).unlink()
    with ScanLock(d / "index.lock", "holder", task="index parse"):
        with pytest.raises(ScanLockTimeout, match=r"index\.lock: the index parse lock of .* held by pid"):
            FaceRecDataset(synth_copy, lock_timeout=0.5)


def test_an_image_label_disagreeing_with_its_identity_record_is_counted_and_refused(synth_copy):
    """Image key k's label says identity 5, but identity record 3 lists key k: a dataset that
    would train silently on a wrong label (the torch and DALI loaders read the image's own
    label). The scan counts such images and refuses the dataset, naming key and record."""
    import struct

    ds = FaceRecDataset(synth_copy)
    labels = ds.scan(progress=False).copy()
    key = int(ds.image_keys[7])
    off = int(ds.image_offsets[7])
    with open(synth_copy / "train.rec", "r+b") as f:
        f.seek(off + 8)
        flag = struct.unpack("<I", f.read(4))[0]
        pos = off + 12 if flag == 0 else off + 8 + 24
        f.seek(pos)
        f.write(struct.pack("<f", float((labels[7] + 1) % 16)))
    import os

    st = os.stat(synth_copy / "train.rec")
    os.utime(synth_copy / "train.rec", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new scan
    with pytest.raises(RecordIOError, match=rf"1 of 96 images have a label that disagrees with their identity "
                                            rf"record \(first: image key {key} has label {(labels[7] + 1) % 16}, "
                                            rf"identity record key \d+ lists it under identity {labels[7]}\)"):
        FaceRecDataset(synth_copy).scan(progress=False)
    d = FaceRecDataset(synth_copy)
    assert not (d.cache_dir / "labels.npy").exists()  # never cached as good
