"""RecordIO framing, index and IRHeader against byte fixtures written from the format (docs/design.md §3)."""
import multiprocessing as mp
import pickle
import struct

import numpy as np
import pytest

from trainer.data.irheader import IRHeader, class_id, pack, unpack
from trainer.data.recordio import (
    MAGIC,
    IndexedRecordReader,
    IndexedRecordWriter,
    RecordIOError,
    encode_record,
    iter_records,
    read_index,
)

M = struct.pack("<I", 0xCED7230A)


def head(cflag, length):
    return M + struct.pack("<I", (cflag << 29) | length)


# Hand-built: a 5-byte record (3 bytes padding) and a record split by MXNet's
# writer because its payload holds the magic at offset 8 (aligned).
PAYLOAD_A = b"hello"
PAYLOAD_SPLIT = b"ABCDEFGH" + M + b"tail!"  # magic at aligned offset 8
FIXTURE = (
    head(0, 5) + b"hello" + b"\0\0\0"
    + head(1, 8) + b"ABCDEFGH"      # first part: bytes before the magic
    + head(3, 5) + b"tail!" + b"\0\0\0"  # last part: bytes after it (magic dropped), padded
)


def test_magic_constant():
    assert MAGIC == 0xCED7230A


def test_encoder_matches_hand_built_bytes():
    assert encode_record(PAYLOAD_A) + encode_record(PAYLOAD_SPLIT) == FIXTURE


def test_unaligned_magic_is_not_split():
    p = b"xy" + M + b"zw"  # magic at offset 2: MXNet only checks aligned offsets
    assert encode_record(p) == head(0, 8) + p


def test_magic_in_trailing_unaligned_bytes_not_split():
    p = b"abcdef" + M  # aligned offsets 0, 4 only (lower_align = 8 -> offsets 0,4): magic at 6
    assert encode_record(p)[:8] == head(0, 10)


def test_several_magics_middle_parts_and_edge_positions():
    p = M + b"1234" + M + M + b"end"
    # offset 0 magic -> empty first part; offset 8 -> middle part "1234"; 12 -> empty middle; last "end"
    expected = head(1, 0) + head(2, 4) + b"1234" + head(2, 0) + head(3, 3) + b"end\0"
    assert encode_record(p) == expected
    assert encode_record(M) == head(1, 0) + head(3, 0)


def test_reader_reassembles_fixture(tmp_path):
    rec = tmp_path / "f.rec"
    rec.write_bytes(FIXTURE)
    (tmp_path / "f.idx").write_text("7\t0\n9\t16\n")
    r = IndexedRecordReader(rec)
    assert r.read(7) == PAYLOAD_A
    assert r.read(9) == PAYLOAD_SPLIT
    assert [p for _, p in iter_records(rec)] == [PAYLOAD_A, PAYLOAD_SPLIT]


@pytest.mark.parametrize("seed", range(3))
def test_round_trip_random_payloads(tmp_path, seed):
    rng = np.random.default_rng(seed)
    payloads = []
    for _i in range(60):
        p = bytearray(rng.integers(0, 256, rng.integers(0, 64)).astype(np.uint8).tobytes())
        for _ in range(rng.integers(0, 3)):  # plant magics at random (aligned or not) offsets
            if len(p) >= 4:
                o = int(rng.integers(0, len(p) - 3))
                p[o:o + 4] = M
        payloads.append(bytes(p))
    with IndexedRecordWriter(tmp_path / "r.rec") as w:
        for i, p in enumerate(payloads):
            w.write(1000 - i, p)
    r = IndexedRecordReader(tmp_path / "r.rec")
    assert all(r.read(1000 - i) == p for i, p in enumerate(payloads))
    assert [p for _, p in iter_records(tmp_path / "r.rec")] == payloads
    assert (tmp_path / "r.rec").stat().st_size % 4 == 0


def test_index_format_is_key_tab_offset(tmp_path):
    with IndexedRecordWriter(tmp_path / "r.rec") as w:
        w.write(5, b"abc")
        w.write(2, b"defgh")
    assert (tmp_path / "r.idx").read_text() == "5\t0\n2\t12\n"


def test_writer_is_atomic_on_error(tmp_path):
    (tmp_path / "r.rec").write_bytes(b"old")
    with pytest.raises(ZeroDivisionError):
        with IndexedRecordWriter(tmp_path / "r.rec") as w:
            w.write(0, b"x")
            raise ZeroDivisionError("a crash while writing")
    assert (tmp_path / "r.rec").read_bytes() == b"old"
    assert not (tmp_path / "r.idx").exists()


# ---------------------------------------------------------------- IRHeader
def test_irheader_scalar_layout():
    b = pack(IRHeader(0, 42.0, 7, 9), b"IMG")
    assert b == struct.pack("<IfQQ", 0, 42.0, 7, 9) + b"IMG"
    h, img = unpack(b)
    assert (h.flag, h.label, h.id, h.id2, img) == (0, 42.0, 7, 9, b"IMG")
    assert class_id(h) == 42


def test_irheader_array_layout_face2rec():
    # insightface face2rec: [label, aligned] -> flag 2, header label 0, floats prepended
    b = pack(IRHeader(0, [3.0, 1.0]), b"J")
    assert b == struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<2f", 3.0, 1.0) + b"J"
    h, img = unpack(b)
    assert h.flag == 2 and h.labels.tolist() == [3.0, 1.0] and img == b"J"
    assert class_id(h) == 3


def test_labels_beyond_float32_exactness_refused():
    ok = IRHeader(0, float(2**24 - 1))
    assert class_id(ok) == 2**24 - 1
    with pytest.raises(RecordIOError, match="2\\^24"):
        class_id(IRHeader(0, float(2**24)))
    with pytest.raises(RecordIOError, match="not an integer"):
        class_id(IRHeader(0, 1.5))
    with pytest.raises(RecordIOError, match="out of range"):
        class_id(IRHeader(0, 10.0), "r", num_classes=10)
    with pytest.raises(RecordIOError, match="negative"):
        class_id(IRHeader(0, -1.0))


def test_short_payload_is_an_error():
    with pytest.raises(RecordIOError, match="shorter than"):
        unpack(b"abc", "x.rec (key 3)")
    with pytest.raises(RecordIOError, match="label bytes"):
        unpack(struct.pack("<IfQQ", 3, 0.0, 0, 0) + b"\0" * 4)


# ---------------------------------------------------------------- bad inputs
def _good(tmp_path, n=4):
    with IndexedRecordWriter(tmp_path / "g.rec") as w:
        for k in range(n):
            w.write(k, pack(IRHeader(0, float(k)), b"x" * (10 + k)))
    return tmp_path / "g.rec", tmp_path / "g.idx"


def test_truncated_rec_names_file_and_key(tmp_path):
    rec, idx = _good(tmp_path)
    data = rec.read_bytes()
    rec.write_bytes(data[:-6])
    r = IndexedRecordReader(rec, idx)
    with pytest.raises(RecordIOError, match=r"g\.rec \(key 3 .*truncated"):
        r.read(3)
    with pytest.raises(RecordIOError, match="truncated"):
        list(iter_records(rec))


def test_bad_magic_names_key(tmp_path):
    rec, idx = _good(tmp_path)
    keys, offs = read_index(idx)
    data = bytearray(rec.read_bytes())
    data[offs[2]:offs[2] + 4] = b"\0\0\0\0"
    rec.write_bytes(bytes(data))
    with pytest.raises(RecordIOError, match=r"key 2 .*bad magic"):
        IndexedRecordReader(rec, idx).read(2)


def test_idx_past_end(tmp_path):
    rec, idx = _good(tmp_path)
    idx.write_text(idx.read_text() + "9\t999996\n")
    with pytest.raises(RecordIOError, match=r"key 9 points to byte 999996, past the end"):
        IndexedRecordReader(rec, idx)


def test_idx_mid_record(tmp_path):
    rec, idx = _good(tmp_path)
    idx.write_text("0\t8\n")
    with pytest.raises(RecordIOError, match=r"key 0 .*bad magic"):
        IndexedRecordReader(rec, idx).read(0)
    idx.write_text("0\t6\n")
    with pytest.raises(RecordIOError, match="not 4-byte aligned"):
        IndexedRecordReader(rec, idx)


def test_idx_continuation_part_is_not_a_record_start(tmp_path):
    (tmp_path / "f.rec").write_bytes(FIXTURE)
    (tmp_path / "f.idx").write_text("1\t36\n")  # points at the cflag-3 part of the split record
    with pytest.raises(RecordIOError, match="continuation"):
        IndexedRecordReader(tmp_path / "f.rec").read(1)


def test_idx_corrupt_line_names_line(tmp_path):
    rec, idx = _good(tmp_path)
    lines = idx.read_text().splitlines()
    lines[1] = "1 garbage"
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordIOError, match=r"g\.idx: line 2 is not"):
        IndexedRecordReader(rec, idx)


def test_missing_files(tmp_path):
    rec, idx = _good(tmp_path)
    idx.unlink()
    with pytest.raises(FileNotFoundError, match="g.idx"):
        IndexedRecordReader(rec, idx)
    with pytest.raises(FileNotFoundError, match="nope.rec"):
        IndexedRecordReader(tmp_path / "nope.rec")


# ---------------------------------------------------------------- processes
def _read_all(reader):
    return [reader.read(k) for k in sorted(reader.keys)]


def test_reader_pickles_and_works_in_other_processes(tmp_path):
    rec, idx = _good(tmp_path, n=32)
    r = IndexedRecordReader(rec, idx)
    expected = _read_all(r)  # opens a descriptor in the parent first
    r2 = pickle.loads(pickle.dumps(r))
    assert r2._fd is None and _read_all(r2) == expected
    for method in ("fork", "spawn"):
        with mp.get_context(method).Pool(2) as pool:
            outs = pool.map(_read_all, [r, r, r])
        assert all(o == expected for o in outs)
