"""DALI CPU pipeline and torch fallback: labels, shards, epochs, equality, bad records."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.distributed import run_world
from trainer.data import build_train_loader, resolve_backend
from trainer.data.face_rec import FaceRecDataset
from trainer.data.torch_loader import decode_image

dali_ok = pytest.mark.skipif(resolve_backend("auto", torch.device("cuda")) != "dali",
                             reason="nvidia-dali not installed")
ROOT = Path(__file__).resolve().parents[2]


def reference(data_dir):
    """hash(uint8 HWC bytes) -> (key, label, flipped) for every image and its mirror."""
    ds = FaceRecDataset(data_dir)
    ref = {}
    for k in ds.image_keys.tolist():
        lab, data = ds.read_image(k)
        img = decode_image(data, "ref")
        ref[img.tobytes()] = (k, lab, False)
        ref[np.ascontiguousarray(img[:, ::-1]).tobytes()] = (k, lab, True)
    return ref


def identify(images, labels, ref):
    """Map each output sample to its record; checks label and uint8 NHWC."""
    assert images.dtype == torch.uint8 and images.shape[1:] == (112, 112, 3)
    assert labels.dtype == torch.int64
    u8 = images.numpy()
    out = []
    for img, lab in zip(u8, labels.tolist()):
        key, true_lab, flipped = ref[np.ascontiguousarray(img).tobytes()]
        assert lab == true_lab, f"key {key}: label {lab} != {true_lab}"
        out.append((key, flipped))
    return out


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=dali_ok)])
def test_reads_what_the_writer_wrote(synth_dir, backend):
    ref = reference(synth_dir)
    L = build_train_loader(synth_dir, 16, backend=backend, num_threads=1, seed=1)
    assert (L.num_classes, L.num_images, len(L)) == (16, 96, 6)
    seen = [s for x, y in L for s in identify(x, y, ref)]
    keys = [k for k, _ in seen]
    assert sorted(keys) == list(range(1, 97))  # all images once, never header/identity records
    flips = sum(f for _, f in seen)
    assert 20 < flips < 76  # random flip happens, about half


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=dali_ok)])
def test_two_shards_cover_each_image_once_per_epoch(synth_dir, backend):
    ref = reference(synth_dir)
    loaders = [build_train_loader(synth_dir, 8, rank=r, world_size=2, backend=backend, num_threads=1, seed=5)
               for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == 6  # 96 // 2 // 8
    orders = []
    for epoch in range(3):
        per_rank = []
        for L in loaders:
            L.set_epoch(epoch)
            per_rank.append([k for x, y in L for k, _ in identify(x, y, ref)])
        assert len(per_rank[0]) == len(per_rank[1]) == 48
        assert sorted(per_rank[0] + per_rank[1]) == list(range(1, 97)), f"epoch {epoch}"
        orders.append(per_rank[0])
    assert orders[0] != orders[1]


def test_epoch_order_deterministic_and_resumable(synth_dir):
    L = build_train_loader(synth_dir, 8, backend="torch", num_threads=0, seed=2)
    L.set_epoch(3)
    full = [(x.clone(), y.clone()) for x, y in L]
    L2 = build_train_loader(synth_dir, 8, backend="torch", num_threads=2, seed=2)
    L2.set_epoch(3, start_batch=4)
    tail = list(L2)
    assert len(tail) == len(full) - 4
    for (a, b), (c, d) in zip(full[4:], tail):
        assert torch.equal(a, c) and torch.equal(b, d)
    L2.set_epoch(4)
    assert not torch.equal(next(iter(L2))[1], full[0][1]) or not torch.equal(next(iter(L2))[0], full[0][0])


def test_drop_last_partial_and_uneven_counts(synth_dir):
    # 96 images, 3 ranks, batch 10 -> 32 per rank -> 3 batches on every rank
    for r in range(3):
        L = build_train_loader(synth_dir, 10, rank=r, world_size=3, backend="torch", num_threads=0)
        assert len(L) == 3 and sum(1 for _ in L) == 3
    with pytest.raises(ValueError, match="cannot fill one batch"):
        build_train_loader(synth_dir, 64, rank=0, world_size=2, backend="torch")


@dali_ok
def test_fallback_gives_same_tensors_as_dali(synth_dir):
    a = build_train_loader(synth_dir, 16, backend="dali", shuffle=False, flip=False, num_threads=2)
    b = build_train_loader(synth_dir, 16, backend="torch", shuffle=False, flip=False, num_threads=0)
    n = 0
    for (x1, y1), (x2, y2) in zip(a, b):
        assert torch.equal(y1, y2)
        assert torch.allclose(x1, x2, atol=1e-6, rtol=0)
        n += 1
    assert n == len(a) == 6


@dali_ok
def test_dali_two_processes_from_process_group(synth_dir):
    res = run_world(_dali_rank, 2, str(synth_dir))
    assert res[0][1] == res[1][1] == 6
    assert sorted(res[0][0] + res[1][0]) == list(range(1, 97))


def _dali_rank(rank, world, data_dir):
    import torch.distributed as dist

    L = build_train_loader(data_dir, 8, rank=dist.get_rank(), world_size=dist.get_world_size(),
                           backend="dali", num_threads=1, seed=9)
    ref = reference(data_dir)
    keys = [k for x, y in L for k, _ in identify(x, y, ref)]
    return keys, len(L)


def test_dali_missing_falls_back_to_torch(synth_dir, monkeypatch):
    import trainer.data.dali_loader as dl

    monkeypatch.setattr(dl, "dali_available", lambda: False)
    assert build_train_loader(synth_dir, 8, backend="auto").backend == "torch"
    with pytest.raises(RuntimeError, match="dali"):
        build_train_loader(synth_dir, 8, backend="dali")
    with pytest.raises(ValueError, match="backend"):
        build_train_loader(synth_dir, 8, backend="mxnet")


_CORRUPT = textwrap.dedent('''
    import sys
    from trainer.data import build_train_loader
    try:
        # DALI: refused before the first epoch (trainer.data.decode_check); torch: while reading
        L = build_train_loader(sys.argv[1], 32, backend=sys.argv[2], shuffle=False, num_threads=1)
        for _ in L:
            pass
    except Exception as e:
        print("ERROR", type(e).__name__, e)
        sys.exit(3)
    print("NO ERROR")
''')


def _corrupt_image(d, key):
    from trainer.data.irheader import IRHeader, pack, unpack
    from trainer.data.recordio import IndexedRecordReader, IndexedRecordWriter

    r = IndexedRecordReader(d / "train.rec")
    recs = {k: r.read(k) for k in r.keys}
    order = sorted(r.keys, key=r.offsets.get)
    h, img = unpack(recs[key])
    recs[key] = pack(IRHeader(0, h.label), img[:20] + b"\x00" * 50)  # JPEG header, garbage body
    r.close()
    with IndexedRecordWriter(d / "train.rec") as w:
        for k in order:
            w.write(k, recs[k])


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=dali_ok)])
def test_undecodable_image_is_a_clear_error_not_a_crash(synth_copy, backend, tmp_path):
    _corrupt_image(synth_copy, 7)
    # own process: a DALI that segfaults (2.2-2.4) must fail this test, not kill pytest
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        UNPG_DATA_CACHE=str(tmp_path / "c2"),
    )
    p = subprocess.run([sys.executable, "-c", _CORRUPT, str(synth_copy), backend], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 3, f"rc={p.returncode} (negative = killed by a signal)\n{p.stdout}\n{p.stderr[-2000:]}"
    assert "train.rec" in p.stdout and "key 7" in p.stdout, p.stdout


def test_validate_clean_index_makes_loaders_skip_bad_record(synth_copy):
    from data_tools.validate import validate

    _corrupt_image(synth_copy, 7)
    rep = validate(synth_copy, write_clean_index=True, progress=False, workers=1)
    assert not rep.ok and "key 7" in rep.text()
    with pytest.warns(UserWarning, match="1 of the 96 image keys"):
        L = build_train_loader(synth_copy, 5, backend="auto", num_threads=1)
    assert L.num_images == 95 and sum(y.numel() for _, y in L) == 95


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=dali_ok)])
def test_augmentations(synth_dir, backend):
    from trainer.data.model_input import to_model_input

    kw = dict(backend=backend, shuffle=False, flip=False, num_threads=1)
    plain = to_model_input(next(iter(build_train_loader(synth_dir, 16, **kw)))[0])
    gray = to_model_input(next(iter(build_train_loader(synth_dir, 16, augment={"gray_prob": 1.0}, **kw)))[0])
    assert (gray[:, 0] - gray[:, 1]).abs().max() < 0.02 and (gray[:, 1] - gray[:, 2]).abs().max() < 0.02
    assert (plain[:, 0] - plain[:, 1]).abs().max() > 0.2
    for aug in ({"resize_prob": 1.0, "resize_min": 0.3}, {"blur_prob": 1.0}, {"hsv_prob": 1.0}):
        x, y = next(iter(build_train_loader(synth_dir, 16, augment=aug, **kw)))
        x = to_model_input(x)
        assert x.shape == plain.shape and x.min() >= -1 and x.max() <= 1
        assert (x - plain).abs().mean() > 0.005, aug
    with pytest.raises(ValueError, match="unknown augment"):
        build_train_loader(synth_dir, 16, augment={"sharpen": 1.0}, **kw)


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=dali_ok)])
def test_face2rec_style_label_arrays(synth_dir, tmp_path, backend):
    """Records with flag 2 ([label, aligned], insightface face2rec) give the first label."""
    from trainer.data.irheader import IRHeader, pack, unpack
    from trainer.data.recordio import IndexedRecordReader, IndexedRecordWriter

    r = IndexedRecordReader(synth_dir / "train.rec")
    with IndexedRecordWriter(tmp_path / "train.rec") as w:
        for k in sorted(r.keys, key=r.offsets.get):
            h, img = unpack(r.read(k))
            if 1 <= k <= 96:
                w.write(k, pack(IRHeader(0, [h.label, 1.0]), img))
            else:
                w.write(k, r.read(k))
    (tmp_path / "property").write_text("16,112,112")
    ref = reference(synth_dir)
    L = build_train_loader(tmp_path, 16, backend=backend, num_threads=1)
    assert sorted(k for x, y in L for k, _ in identify(x, y, ref)) == list(range(1, 97))


def test_writer_refuses_ids_float32_cannot_hold(tmp_path):
    from data_tools.layout import plan_layout

    with pytest.raises(ValueError, match="2\\^24"):
        plan_layout([0, 1], 2**24 + 1)


@dali_ok
def test_dali_epoch_deterministic_and_resumable(synth_dir):
    L = build_train_loader(synth_dir, 16, backend="dali", num_threads=1, seed=4)
    L.set_epoch(2)
    full = [(x.clone(), y.clone()) for x, y in L]
    L.set_epoch(2, start_batch=3)
    tail = [(x.clone(), y.clone()) for x, y in L]
    assert len(tail) == len(full) - 3
    for (a, b), (c, d) in zip(full[3:], tail):
        assert torch.equal(a, c) and torch.equal(b, d)
    L.set_epoch(3)
    other = torch.cat([y for _, y in L])
    assert not torch.equal(other, torch.cat([y for _, y in full]))


@dali_ok
def test_dali_warns_on_identity_sorted_file(tmp_path):
    from data_tools.synth import generate_dataset

    generate_dataset(tmp_path / "s", 8, 10, seed=2, workers=1, shuffle=False)
    with pytest.warns(UserWarning, match="sorted by identity"):
        build_train_loader(tmp_path / "s", 8, backend="dali", shuffle_buffer=32)
    generate_dataset(tmp_path / "r", 8, 10, seed=2, workers=1, shuffle=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_train_loader(tmp_path / "r", 8, backend="dali", shuffle_buffer=32)


# --------------------------------------------------------------------------- block / global selection
_SMALL_BLOCKS = 20_000  # ~3 synthetic JPEGs per block: many blocks in the 96-image file


@pytest.mark.parametrize("mode", ["block", "global"])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=dali_ok)])
def test_each_image_once_across_ranks_per_epoch(synth_dir, backend, world, mode):
    ref = reference(synth_dir)
    loaders = [build_train_loader(synth_dir, 8, rank=r, world_size=world, backend=backend, num_threads=0
                                  if backend == "torch" else 1, seed=5, shuffle_mode=mode,
                                  block_bytes=_SMALL_BLOCKS, shuffle_buffer=16) for r in range(world)]
    n_batches = (96 // world) // 8
    assert all(len(L) == n_batches for L in loaders)
    used = []
    for epoch in range(2):
        keys = []
        for L in loaders:
            L.set_epoch(epoch)
            got = [k for x, y in L for k, _ in identify(x, y, ref)]
            assert len(got) == n_batches * 8
            keys += got
        assert len(set(keys)) == len(keys) == world * n_batches * 8, f"epoch {epoch}"
        assert set(keys) <= set(range(1, 97))
        used.append(keys)
    assert used[0] != used[1]


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=dali_ok)])
def test_block_mode_deterministic_and_resumable(synth_dir, backend):
    kw = dict(backend=backend, num_threads=1, seed=4, rank=1, world_size=2, block_bytes=_SMALL_BLOCKS,
              shuffle_buffer=12)
    L = build_train_loader(synth_dir, 8, **kw)
    L.set_epoch(2)
    full = [(x.clone(), y.clone()) for x, y in L]
    L2 = build_train_loader(synth_dir, 8, **kw)  # a fresh process would build it again
    L2.set_epoch(2, start_batch=2)
    tail = [(x.clone(), y.clone()) for x, y in L2]
    assert len(tail) == len(full) - 2 == 4
    for (a, b), (c, d) in zip(full[2:], tail):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_torch_block_mode_reads_in_byte_order_within_a_batch(synth_dir, monkeypatch):
    from trainer.data.plan import read_pattern
    from trainer.data.recordio import IndexedRecordReader

    reads = []
    orig = IndexedRecordReader.read
    monkeypatch.setattr(IndexedRecordReader, "read", lambda self, k: reads.append(self.offsets[k]) or orig(self, k))
    L = build_train_loader(synth_dir, 16, backend="torch", num_threads=0, block_bytes=_SMALL_BLOCKS,
                           shuffle_buffer=32)
    reads.clear()  # the header record read when opening the dataset
    n = sum(1 for _ in L)
    assert len(reads) == 16 * n
    per_batch = np.asarray(reads).reshape(n, 16)
    assert (np.diff(per_batch, axis=1) > 0).all()
    assert read_pattern(np.asarray(reads), np.ones(len(reads)))["increasing"] >= 14 / 15 - 1e-9


@dali_ok
def test_dali_reads_only_its_own_share(synth_dir):
    loaders = [build_train_loader(synth_dir, 8, rank=r, world_size=3, backend="dali", num_threads=1,
                                  block_bytes=_SMALL_BLOCKS) for r in range(3)]
    idx = [L._epoch_index(1) for L in loaders]
    lines = [Path(p).read_text().splitlines() for p in idx]
    assert [len(x) for x in lines] == [32, 32, 32]  # each index holds one rank's images only
    offs = [[int(line.split("\t")[1]) for line in x] for x in lines]
    assert all(o == sorted(o) for o in offs)
    keys = [int(line.split("\t")[0]) for x in lines for line in x]
    assert len(set(keys)) == 96


def test_bad_selection_options_are_named(synth_dir):
    with pytest.raises(ValueError, match="shuffle_mode must be one of"):
        build_train_loader(synth_dir, 8, backend="torch", shuffle_mode="random")
    with pytest.raises(ValueError, match="block_bytes must be > 0"):
        build_train_loader(synth_dir, 8, backend="torch", block_bytes=0)


def test_to_model_input_is_the_normalisation_the_models_expect(synth_dir):
    """uint8 NHWC -> float NCHW in [-1, 1] on the device: the same tensor the float pipeline gave."""
    from trainer.data import build_train_loader
    from trainer.data.model_input import to_model_input

    images, _ = next(iter(build_train_loader(synth_dir, 8, backend="torch", num_threads=0, seed=1)))
    x = to_model_input(images)
    ref = images.permute(0, 3, 1, 2).to(torch.float64) / 127.5 - 1.0
    assert x.dtype == torch.float32 and x.shape == (8, 3, 112, 112)
    assert (x.double() - ref).abs().max() <= 1e-6
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert to_model_input(x) is x
    # the .bin sets' NCHW batches go through the same rule (one rule, a layout argument)
    nchw = to_model_input(images.permute(0, 3, 1, 2).contiguous(), layout="NCHW")
    assert nchw.shape == x.shape and torch.equal(nchw, x)
    with pytest.raises(ValueError, match="layout must be one of"):
        to_model_input(images, layout="HWC")


def _flip_entropy_bytes(d, key):
    """Flip bytes inside the entropy-coded data of image ``key``: simplejpeg/PIL (validate,
    the torch loader) reject it; DALI's decoder returns garbled pixels without an error."""
    from trainer.data.irheader import IRHeader, pack, unpack
    from trainer.data.recordio import IndexedRecordReader, IndexedRecordWriter

    r = IndexedRecordReader(d / "train.rec")
    recs = {k: r.read(k) for k in r.keys}
    order = sorted(r.keys, key=r.offsets.get)
    h, img = unpack(recs[key])
    sos = img.index(b"\xff\xda")
    body = bytearray(img)
    for i in range(sos + 20, len(body) - 4, 7):
        body[i] ^= 0xA5
    recs[key] = pack(IRHeader(0, h.label), bytes(body))
    r.close()
    with IndexedRecordWriter(d / "train.rec") as w:
        for k in order:
            w.write(k, recs[k])


def test_dali_refuses_what_validate_rejects(synth_copy, monkeypatch):
    """The decode check the DALI loader runs: same verdict as validate, once, stored."""
    from data_tools.validate import validate
    from trainer.data import decode_check
    from trainer.data.recordio import RecordIOError
    from trainer.data.torch_loader import decode_image

    _flip_entropy_bytes(synth_copy, 7)
    ds = FaceRecDataset(synth_copy)
    with pytest.raises(RecordIOError):
        decode_image(ds.read_image(7)[1], "key 7")  # the torch loader's decoder rejects it
    with pytest.raises(decode_check.BadRecordError, match=r"train\.rec \(key 7\).*validate .*--write-index"):
        decode_check.ensure_decodable(FaceRecDataset(synth_copy), num_threads=2)
    rep = validate(synth_copy, write_clean_index=True, progress=False, workers=1)
    assert not rep.ok and "key 7" in rep.text() and "decode verdict recorded: 1 of 1 chunks" in rep.text()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clean = FaceRecDataset(synth_copy)
    monkeypatch.setattr(decode_check, "decode_rgb", lambda *a, **k: pytest.fail("decoded again"))
    assert decode_check.ensure_decodable(clean) == 0  # validate's verdict is trusted


def test_dali_loader_runs_the_decode_check(synth_copy, monkeypatch):
    """DaliFaceLoader (no DALI needed up to its first epoch) checks its epoch index ahead of DALI."""
    import types

    from trainer.data import dali_loader

    fake = types.ModuleType("nvidia.dali")
    fake.__version__ = dali_loader.DALI_VERSION
    parent = types.ModuleType("nvidia")
    parent.dali = fake
    monkeypatch.setitem(sys.modules, "nvidia", parent)
    monkeypatch.setitem(sys.modules, "nvidia.dali", fake)
    _flip_entropy_bytes(synth_copy, 7)
    from trainer.data.decode_check import BadRecordError, RunAhead

    L = dali_loader.DaliFaceLoader(FaceRecDataset(synth_copy), 4, 0, 1, torch.device("cpu"), num_threads=1)
    assert L.verdicts.size == (112, 112)
    _, offs = L.rank_index_arrays(0)
    with pytest.raises(BadRecordError, match=r"key 7"):
        RunAhead(L.verdicts, offs).wait(offs.size)


# --------------------------------------------------------------------------- elastic: segments
def _consume(synth_dir, ref, world, batch, batches, segments, backend="torch", mode="block"):
    keys = []
    for r in range(world):
        L = build_train_loader(synth_dir, batch, rank=r, world_size=world, backend=backend, num_threads=0
                               if backend == "torch" else 1, seed=5, shuffle_mode=mode,
                               block_bytes=_SMALL_BLOCKS, shuffle_buffer=16)
        L.set_epoch(1, segments=segments)
        assert L.segment_len() >= (batches or 0)
        got = []
        for b, (x, y) in enumerate(L):
            if batches is not None and b == batches:
                break
            got += [k for k, _ in identify(x, y, ref)]
        keys += got
    return keys


@pytest.mark.parametrize("mode", ["block", "global"])
def test_torch_loader_each_image_once_across_world_and_batch_changes(synth_dir, mode):
    """Epoch 1: 4 ranks x 4 for 2 batches, then 2 ranks x 6 for 2, then 3 ranks x 4 to the end:
    96 images, 92 used, none twice (the 4 left are the last segment's rounding)."""
    ref = reference(synth_dir)
    keys = _consume(synth_dir, ref, 4, 4, 2, ())
    keys += _consume(synth_dir, ref, 2, 6, 2, [(4, 4, 2)])
    keys += _consume(synth_dir, ref, 3, 4, None, [(4, 4, 2), (2, 6, 2)])
    assert len(keys) == 32 + 24 + 36
    assert len(set(keys)) == len(keys), sorted(k for k in set(keys) if keys.count(k) > 1)


@dali_ok
@pytest.mark.parametrize("mode", ["block", "global"])
def test_dali_each_image_once_across_world_and_batch_changes(synth_dir, mode):
    """The DALI loader replays its reader to know what an interrupted segment served: the same
    4 -> 2 -> 3 ranks sequence as the torch loader's, exactly once."""
    ref = reference(synth_dir)
    kw = dict(backend="dali", mode=mode)
    keys = _consume(synth_dir, ref, 4, 4, 2, (), **kw)
    keys += _consume(synth_dir, ref, 2, 6, 2, [(4, 4, 2)], **kw)
    keys += _consume(synth_dir, ref, 3, 4, None, [(4, 4, 2), (2, 6, 2)], **kw)
    assert len(keys) == 32 + 24 + 36
    assert len(set(keys)) == len(keys), sorted(k for k in set(keys) if keys.count(k) > 1)


@dali_ok
def test_dali_replay_matches_the_real_reader(synth_dir):
    """replay_reader's positions are what the real pipeline (decode, flip) served, batch by batch."""
    ref = reference(synth_dir)
    L = build_train_loader(synth_dir, 8, rank=1, world_size=2, backend="dali", num_threads=1, seed=5,
                           shuffle_buffer=16, block_bytes=_SMALL_BLOCKS)
    L.set_epoch(1)
    real = [sorted(k for k, _ in identify(x, y, ref)) for x, y in L]
    share, _ = L.segment(1)
    used = L.consumed(share, 1, 1, 0, 2, 8, len(real))
    keys = L.ds.image_keys[used].reshape(len(real), 8)
    assert [sorted(k.tolist()) for k in keys] == real
    # and it is not the byte order: the replay is what makes it right
    srt = share[np.argsort(L._offsets[share], kind="stable")]
    assert [sorted(k.tolist()) for k in L.ds.image_keys[srt].reshape(len(real), 8)] != real
