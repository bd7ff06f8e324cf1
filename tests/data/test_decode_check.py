"""The DALI loader's decode check (trainer/data/decode_check.py): verdicts per chunk of the file,
keyed by content, reused at any world size; checked ahead of the reader, never behind it."""
import os

import numpy as np
import pytest

from tests.data.test_loaders import dali_ok, identify, reference
from trainer.data import build_train_loader
from trainer.data.face_rec import FaceRecDataset


def _flip_in_place(d, key):
    """Garble the entropy-coded data of image ``key`` inside train.rec without changing the
    file's size, inode or mtime (a rewrite in place that a stat-based key cannot see)."""
    from trainer.data.irheader import unpack

    ds = FaceRecDataset(d)
    off = int(ds.reader.offsets[key])
    payload = ds.reader.read(key)
    _, img = unpack(payload)
    start = off + 8 + len(payload) - len(img)  # the image's first byte in the file
    sos = img.index(b"\xff\xda")
    body = bytearray(img)
    for i in range(sos + 20, len(body) - 4, 7):
        body[i] ^= 0xA5
    rec = d / "train.rec"
    st = rec.stat()
    with open(rec, "r+b") as f:
        f.seek(start)
        f.write(bytes(body))
    os.utime(rec, ns=(st.st_atime_ns, st.st_mtime_ns))
    st2 = rec.stat()
    assert (st2.st_ino, st2.st_size, st2.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)


@dali_ok
def test_in_place_corruption_after_validate_is_refused(synth_copy):
    """issue 25: a .rec rewritten in place (same size, mtime, inode) after a passed validation."""
    from data_tools.validate import validate
    from trainer.data.decode_check import BadRecordError

    rep = validate(synth_copy, progress=False, workers=1)
    assert rep.ok and "decode verdict recorded" in rep.text()
    _flip_in_place(synth_copy, 7)
    with pytest.raises(BadRecordError, match=r"train\.rec \(key 7\)"):
        for _ in build_train_loader(synth_copy, 8, backend="dali", num_threads=1, shuffle=False):
            pass


def _count_decodes(monkeypatch):
    from trainer.data import decode_check

    seen = []
    real = decode_check.decode_rgb

    def counting(data, where, **kw):
        seen.append(where)
        return real(data, where, **kw)

    monkeypatch.setattr(decode_check, "decode_rgb", counting)
    return seen


@dali_ok
def test_verdict_reused_after_two_to_three_ranks(synth_copy, monkeypatch):
    """Ranks share chunk verdicts: at 2 ranks each image is decoded once in all (rank 1 skips the
    chunks rank 0 checked); at 3 ranks nothing is decoded again."""
    from trainer.data import decode_check

    monkeypatch.setattr(decode_check, "CHUNK_BYTES", 4096)  # a dozen chunks in the small set
    ds = FaceRecDataset(synth_copy)
    assert decode_check.ChunkVerdicts(ds).all_chunks().size >= 8
    seen = _count_decodes(monkeypatch)
    for r in range(2):
        for _ in build_train_loader(synth_copy, 8, rank=r, world_size=2, backend="dali", num_threads=2, seed=4):
            pass
    assert sorted(seen) == sorted(f"{ds.rec_path} (key {k})" for k in range(1, 97))  # each once
    monkeypatch.setattr(decode_check, "decode_rgb", lambda *a, **k: pytest.fail("decoded again"))
    ref = reference(synth_copy)
    keys = []
    for r in range(3):
        L = build_train_loader(synth_copy, 8, rank=r, world_size=3, backend="dali", num_threads=2, seed=4)
        L.set_epoch(1)
        keys += [k for x, y in L for k, _ in identify(x, y, ref)]
    assert sorted(keys) == list(range(1, 97))


@dali_ok
@pytest.mark.parametrize("shuffle", [False, True])
def test_bad_record_stops_the_run_before_dali_hands_it_over(synth_copy, monkeypatch, shuffle):
    """A garbled JPEG (DALI decodes it without an error) never reaches training: the run stops
    naming file and key, at the latest at the batch that would hold it."""
    from tests.data.test_loaders import _flip_entropy_bytes
    from trainer.data import decode_check

    monkeypatch.setattr(decode_check, "CHUNK_BYTES", 4096)
    ref = reference(synth_copy)
    _flip_entropy_bytes(synth_copy, 7)
    L = build_train_loader(synth_copy, 8, backend="dali", num_threads=1, shuffle=shuffle, seed=2)
    got = []
    with pytest.raises(decode_check.BadRecordError, match=r"train\.rec \(key 7\).*validate .*--write-index"):
        for x, _y in L:
            for img in x.numpy():
                got.append(ref.get(np.ascontiguousarray(img).tobytes(), ("garbled",))[0])
    assert "garbled" not in got and 7 not in got


def test_run_ahead_waits_for_the_records_dali_can_draw(synth_copy, monkeypatch):
    """RunAhead.wait(m) returns only once every chunk holding one of the first m records of the
    index is verified (a slow checker is waited for, not overtaken)."""
    import threading

    from trainer.data import decode_check

    monkeypatch.setattr(decode_check, "CHUNK_BYTES", 4096)
    ds = FaceRecDataset(synth_copy)
    v = decode_check.ChunkVerdicts(ds)
    offs = np.sort(np.asarray(ds.image_offsets))
    gate = threading.Event()
    done = []
    real = v.ensure

    def slow(c):
        if c == int(offs[40] // 4096):
            gate.wait(30)
        done.append(c)
        return real(c)

    monkeypatch.setattr(v, "ensure", slow)
    ra = decode_check.RunAhead(v, offs, num_threads=1)
    ra.wait(20)  # chunks before record 40's are not held
    assert int(offs[19] // 4096) in done
    t = threading.Thread(target=ra.wait, args=(41,))
    t.start()
    t.join(0.5)
    assert t.is_alive()  # record 40's chunk is not verified yet
    gate.set()
    t.join(30)
    assert not t.is_alive() and int(offs[40] // 4096) in done
    ra.wait(offs.size)


@dali_ok
@pytest.mark.parametrize("batch,fill,shuffle", [(8, 64, True), (32, 100, True), (16, 1, True), (8, 64, False)])
def test_dali_reader_reads_within_the_bound(tmp_path, batch, fill, shuffle):
    """The gate's assumption: DALI's mxnet reader emits, by the end of batch b, only records of
    index positions < records_before_batch(b) (labels here = index position)."""
    import io

    from nvidia.dali import fn, pipeline_def
    from PIL import Image

    from trainer.data.decode_check import records_before_batch
    from trainer.data.irheader import IRHeader, pack
    from trainer.data.recordio import IndexedRecordWriter

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    with IndexedRecordWriter(tmp_path / "t.rec") as w:
        for i in range(2000):
            w.write(i, pack(IRHeader(0, float(i)), buf.getvalue()))

    @pipeline_def
    def pipe():
        _, lab = fn.readers.mxnet(path=[str(tmp_path / "t.rec")], index_path=[str(tmp_path / "t.idx")],
                                  random_shuffle=shuffle, initial_fill=fill, pad_last_batch=True,
                                  stick_to_shard=True, name="Reader")
        return lab

    p = pipe(batch_size=batch, num_threads=1, device_id=None, seed=3, prefetch_queue_depth=2)
    p.build()
    tight = 0
    for b in range(40):
        (lab,) = p.run()
        top = int(np.asarray(lab.as_tensor())[:, 0].max())
        assert top < records_before_batch(b, batch, fill, shuffle), f"batch {b}"
        tight = max(tight, top + 1 - ((b + 1) * batch + (fill if shuffle else 0)))
    assert tight <= 0  # the bound keeps a margin of 3 batches on top of what DALI does


def test_validate_decodes_every_chunk_in_parallel_and_lists_every_bad_record(synth_copy, monkeypatch):
    """validate's chunk pass on 2 processes: every bad record listed (not only the first), a
    verdict for exactly the chunks without one, which the loader's check then trusts."""
    from data_tools.validate import validate
    from tests.data.test_loaders import _flip_entropy_bytes
    from trainer.data import decode_check

    monkeypatch.setattr(decode_check, "CHUNK_BYTES", 4096)
    _flip_entropy_bytes(synth_copy, 7)
    _flip_entropy_bytes(synth_copy, 50)
    ds = FaceRecDataset(synth_copy)
    v = decode_check.ChunkVerdicts(ds)
    bad_chunks = {int(ds.reader.offsets[k]) // 4096 for k in (7, 50)}
    rep = validate(synth_copy, progress=False, workers=2)
    text = rep.text()
    assert not rep.ok and "(key 7)" in text and "(key 50)" in text and "PROBLEM image: 2" in text
    n = v.all_chunks().size
    assert f"decode verdict recorded: {n - len(bad_chunks)} of {n} chunks" in text
    seen = _count_decodes(monkeypatch)
    with pytest.raises(decode_check.BadRecordError):
        decode_check.ensure_decodable(FaceRecDataset(synth_copy))
    assert len(seen) and all(int(ds.reader.offsets[int(w.split("key ")[1].rstrip(")"))]) // 4096 in bad_chunks
                             for w in seen)  # only the chunks without a verdict are decoded


def test_run_ahead_wait_has_a_bound(synth_copy, monkeypatch):
    """A checker that makes no progress (a hung read) ends the wait with an error naming the file."""
    import threading

    from trainer.data import decode_check

    ds = FaceRecDataset(synth_copy)
    v = decode_check.ChunkVerdicts(ds)
    hang = threading.Event()
    monkeypatch.setattr(v, "ensure", lambda c: hang.wait(30) and 0)
    monkeypatch.setattr(decode_check.RunAhead, "STALL_S", 0.5)
    ra = decode_check.RunAhead(v, np.sort(np.asarray(ds.image_offsets)))
    try:
        with pytest.raises(TimeoutError, match=r"train\.rec: the decode check verified no chunk"):
            ra.wait(1)
    finally:
        hang.set()
        ra.close()
