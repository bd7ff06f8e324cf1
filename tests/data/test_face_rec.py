"""insightface layout: header record 0, identity records, labels, bad records."""
import numpy as np
import pytest

from data_tools.layout import write_face_rec
from trainer.data.face_rec import FaceRecDataset, read_property
from trainer.data.recordio import IndexedRecordReader, IndexedRecordWriter, IRHeader, RecordIOError, pack, unpack
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
        w.write(3, pack(IRHeader(0, [1, 3])))
        w.write(4, pack(IRHeader(0, [3, 3])))
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
    assert sorted(int(l.split("\t")[0]) for l in lines) == ds.image_keys.tolist()
