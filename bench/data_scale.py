"""The data path at scale: per-rank epoch start, label scan, index bytes, read pattern, mixing.

    python -m bench.data_scale [--n 2000000] [--ranks 8] [--batch 128]
    python -m bench.data_scale --n 42000000          # WebFace42M size (~1.5 GB .rec)

Writes a synthetic RecordIO of N tiny image records (IRHeader + a decodable
1x1 JPEG of 159 bytes, 192 bytes a record; ``--payload tiny``: a 4-byte
non-image, 36 bytes a record, label scan and plan rows only; framed exactly as
``trainer.data.recordio``'s writer frames them: checked against
``encode_record(pack(...))``), stored in identity order (``--images-per-id`` consecutive records per identity, as
insightface's files are), and its ``.idx``. Then, in one run:

* label scan: ``FaceRecDataset(...).scan()`` (vectorised) over all N records
  (first, from the page cache) and a second process's open + cached load; the former
  per-record loop (one ``pread`` per record, ``unpack``, ``class_id``) timed on
  the first ``--old-scan-sample`` records and extrapolated to N (linear);
* per simulated rank (a fresh process each, the dataset's key/offset arrays
  already in memory): epoch-start time and extra peak RSS of the new per-rank
  selection + DALI index write (``RankPlan`` block shuffle, numpy index
  writer), of the torch loader's plan (block + shuffle window), and of the
  former whole-epoch index (``epoch_selection`` + sort + ``write_index`` of a
  tuple list, what every rank ran before) while ``N <= --old-max-n``;
  index bytes written per rank; and (DALI installed) the whole
  ``build_train_loader(backend="dali")`` + first epoch index with cached labels;
* the decode check (trainer/data/decode_check.py) in the loader's path: the
  DALI loader rows run with it (1x1 images, ``image_size=(1, 1)``), cold (no
  verdicts: the first batch waits for the chunks it needs) and warm; the
  decode pass of one rank's epoch-0 share at N and R (``--decode-ranks``, fresh
  process), cold (decode + content key) and warm (content key only: a read and
  a hash of the chunks), and the content key of the whole file; the same pass
  on ``--decode-sample`` real-size 112x112 JPEGs at 1 and 2 threads, whose
  rate gives the per-rank time at N and R for real images (extrapolated, said so);
* read pattern of rank 0 in epoch 0 (order of reads each loader issues):
  fraction of reads at increasing offsets (overall and within a block),
  records per seek;
* mixing on rank 0: identities per batch and the fraction of repeated labels
  in a batch, for a global shuffle, the block shuffle through the torch window,
  and the block shuffle through DALI's own reader + ``initial_fill`` buffer
  (a real DALI CPU pipeline reading the rank index, labels only).

Ratios are new vs old from the same run. Numbers for N larger than
``--old-max-n`` for the old path are not measured (a 42M whole index needs
~11 GB per rank); the run says so.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data import plan
from trainer.data.face_rec import FaceRecDataset, write_property
from trainer.data.irheader import IR_SIZE, IRHeader, class_id, pack, unpack
from trainer.data.recordio import encode_record, read_record_header, write_index, write_index_arrays

REC_BYTES = 36  # 8 framing + 24 IRHeader + 4 payload (--payload tiny)
PAYLOAD = b"\xff\xd8\xff\xd9"


def jpeg_1x1() -> bytes:
    """A decodable 1x1 grayscale JPEG (159 bytes, optimised Huffman tables): passes the
    decode check at ``image_size=(1, 1)`` and runs DALI's real pipeline."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (1, 1), 120).save(buf, format="JPEG", optimize=True)
    return buf.getvalue()


def real_jpegs(count: int, distinct: int = 256, seed: int = 0) -> list:
    """``count`` 112x112 RGB JPEGs (quality 90, smooth noise: ~3-5 kB, about a WebFace42M
    record), ``distinct`` different images repeated."""
    import io

    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    imgs = []
    for _ in range(distinct):
        a = Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(2))
        buf = io.BytesIO()
        a.save(buf, format="JPEG", quality=90)
        imgs.append(buf.getvalue())
    return [imgs[i % distinct] for i in range(count)]


# --------------------------------------------------------------------------- synthetic data
def write_synthetic(d: Path, n: int, per_id: int, payload: bytes = PAYLOAD, chunk: int = 1 << 20) -> float:
    """N records (keys 0..N-1, label i // per_id): the project's framing of one record
    (``encode_record(pack(...))``) tiled with numpy, the label patched per record; seconds."""
    t = time.perf_counter()
    d.mkdir(parents=True, exist_ok=True)
    template = np.frombuffer(encode_record(pack(IRHeader(0, 0.0), payload)), np.uint8)
    rb = template.size
    assert rb % 4 == 0 and template[4:8].view("<u4")[0] >> 29 == 0, "payload splits: choose another"
    with open(d / "train.rec", "wb") as f:
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            rec = np.tile(template, (m, 1))
            rec[:, 12:16] = (np.arange(s, s + m) // per_id).astype("<f4").view(np.uint8).reshape(m, 4)
            f.write(rec.tobytes())
    keys = np.arange(n, dtype=np.int64)
    write_index_arrays(d / "train.idx", keys, keys * rb)
    write_property(d, (n - 1) // per_id + 1)
    with open(d / "train.rec", "rb") as f:  # spot check against the writer
        head = f.read(3 * rb)
    want = b"".join(encode_record(pack(IRHeader(0, float(i // per_id)), payload)) for i in range(3))
    assert head == want[:len(head)], "synthetic framing differs from encode_record"
    return time.perf_counter() - t


def old_scan(rec: Path, offsets: np.ndarray, num_classes: int) -> float:
    """The former per-record loop (one pread of the head per record) on ``offsets``; seconds."""
    size = rec.stat().st_size
    fd = os.open(rec, os.O_RDONLY)
    reader = lambda off, k: os.pread(fd, k, off)  # noqa: E731
    t = time.perf_counter()
    try:
        for off in offsets.tolist():
            where = f"{rec} (byte {off})"
            _, length = read_record_header(reader, off, size, where)
            h, _ = unpack(reader(off + 8, min(IR_SIZE + 64, length)), where)
            class_id(h, where, num_classes)
            if length - IR_SIZE - 4 * max(h.flag, 0) <= 0:
                raise AssertionError("empty")
    finally:
        os.close(fd)
    return time.perf_counter() - t


# --------------------------------------------------------------------------- one rank (child process)
def _rss_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def child(args) -> None:
    """Epoch start of one rank in a fresh process: time and peak RSS above the loaded dataset."""
    d = Path(args.dir)
    n = args.n
    if args.what == "loader":  # the DALI loader (labels cached) + the epoch's index + first batch
        import nvidia.dali.plugin.pytorch  # noqa: F401
        import torch

        from trainer.data.dali_loader import DaliFaceLoader

        os.environ["UNPG_DATA_CACHE"] = str(d / "cache")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss0, file0 = _rss_kb("VmRSS:"), _rss_kb("RssFile:")
        t = time.perf_counter()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the identity-sorted warning (the file is, on purpose)
            # what build_train_loader(backend="dali") builds, at the images' size (1x1)
            L = DaliFaceLoader(FaceRecDataset(d / "data"), args.batch, args.rank, args.ranks,
                               torch.device("cpu"), num_threads=args.threads, image_size=(1, 1))
        idx = L._epoch_index(0)
        nbytes = os.path.getsize(idx)
        t_build = time.perf_counter() - t
        x, y = next(iter(L))  # DALI pipeline + the decode check's gate for the first batch
        dt = time.perf_counter() - t
        print(json.dumps({"s": dt, "build_s": t_build, "extra_mb": (_rss_kb("VmHWM:") - rss0) / 1024,
                          "index_bytes": nbytes, "first_batch": [list(x.shape), int(y.numel())],
                          "file_mb": (_rss_kb("RssFile:") - file0) / 1024}))
        return
    if args.what in ("decode", "keyall"):  # the decode check of the rank's epoch-0 share / whole file
        from trainer.data import decode_check

        os.environ["UNPG_DATA_CACHE"] = str(d / "cache")
        ds = FaceRecDataset(d / args.data)
        size = (1, 1) if args.data == "data" else (112, 112)
        v = decode_check.ChunkVerdicts(ds, size)
        if args.what == "decode":
            per_rank = plan.batches_per_rank(ds.num_images, args.ranks, args.batch) * args.batch
            p = plan.RankPlan(ds.image_offsets, args.rank, args.ranks, per_rank, args.seed, True, "block",
                              plan.block_images_for(ds.image_offsets, ds.reader.file_size, plan.DEFAULT_BLOCK_BYTES))
            offs = np.sort(ds.image_offsets[p.rank_positions(0)])
            chunks = v.chunks_of(offs)
            t = time.perf_counter()
            decoded = decode_check.ensure_decodable(ds, offs, num_threads=args.threads, verdicts=v)
        else:
            chunks = v.all_chunks()
            from concurrent.futures import ThreadPoolExecutor

            t = time.perf_counter()
            with ThreadPoolExecutor(args.threads) as pool:
                list(pool.map(lambda c: v.check(c, decode=False), chunks.tolist()))
            decoded, per_rank = 0, ds.num_images
        dt = time.perf_counter() - t
        nbytes = sum(int(v.chunk_records(c)[1][-1] - v.chunk_records(c)[1][0]) for c in chunks.tolist())
        checked = sum(int(v.chunk_records(c)[0].size) for c in chunks.tolist())
        print(json.dumps({"s": dt, "records": int(per_rank), "checked": checked, "decoded": int(decoded),
                          "chunks": int(chunks.size), "bytes": nbytes}))
        return
    keys = np.arange(n, dtype=np.int64)  # the dataset state (opened, labels scanned)
    offsets = keys * args.rec_bytes
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS counter
    except OSError:
        pass
    rss0 = _rss_kb("VmRSS:")
    per_rank = plan.batches_per_rank(n, args.ranks, args.batch) * args.batch
    out = d / f"rank{args.rank}-{args.what}.idx"
    t = time.perf_counter()
    if args.what == "old":  # the former DaliFaceLoader._epoch_index, verbatim
        sel = plan.epoch_selection(offsets, args.seed, 0, per_rank * args.ranks, True)
        sel = sel[np.argsort(offsets[sel], kind="stable")]
        write_index(out, [(int(keys[i]), int(offsets[i])) for i in sel])
    else:
        K = args.block_images
        p = plan.RankPlan(offsets, args.rank, args.ranks, per_rank, args.seed, True, "block", K)
        pos = p.rank_positions(0)
        if args.what == "new-dali":
            offs = offsets[pos]
            o = np.argsort(offs, kind="stable")
            write_index_arrays(out, keys[pos[o]], offs[o])
        else:  # new-torch: window shuffle + flips, as TorchFaceLoader.epoch_plan
            pos = plan.window_shuffle(pos, min(args.buffer, per_rank), np.random.default_rng([0, 0, args.rank]))
            plan.rank_flips(args.seed, 0, args.rank, per_rank)
    dt = time.perf_counter() - t
    peak = _rss_kb("VmHWM:")
    nbytes = out.stat().st_size if out.exists() else 0
    if out.exists():
        out.unlink()
    print(json.dumps({"s": dt, "extra_mb": (peak - rss0) / 1024, "index_bytes": nbytes}))


def run_rank(a, rank: int, what: str, threads: int = 1, data: str = "data", ranks: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child", "--dir", str(a.dir), "--n", str(a.n), "--ranks", str(ranks or a.ranks),
           "--batch", str(a.batch), "--rank", str(rank), "--what", what, "--block-images", str(a.block_images),
           "--buffer", str(a.buffer), "--seed", str(a.seed), "--rec-bytes", str(a.rec_bytes),
           "--payload", a.payload, "--threads", str(threads), "--data", data]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if p.returncode:
        raise SystemExit(f"rank {rank} ({what}) failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the decode check
def write_real(d: Path, count: int) -> float:
    """``count`` records of real-size 112x112 JPEGs (labels i // 20); mean bytes per record."""
    from trainer.data.recordio import IndexedRecordWriter

    d.mkdir(parents=True, exist_ok=True)
    with IndexedRecordWriter(d / "train.rec") as w:
        for i, img in enumerate(real_jpegs(count)):
            w.write(i, pack(IRHeader(0, float(i // 20)), img))
    write_property(d, (count - 1) // 20 + 1)
    return (d / "train.rec").stat().st_size / count


def decode_report(a, dec: dict, n: int, R: int) -> None:
    """Rows of the decode pass per rank at N and R (cold, warm), the content key of the whole
    file, and the real-image rate with the per-rank time it gives at N and R."""
    import shutil

    store = a.dir / "cache" / "decode-verdicts"
    T = a.decode_threads
    print(f"\n== decode check (trainer/data/decode_check.py; chunks of {(1 << 20) >> 10} KiB of .rec, fresh process "
          "per row)")
    print("(records: the rank's share; checked: the records of the chunks holding it; decoded: of those, "
          "decoded now; images/s = checked / time)")
    print(f"{'pass':44s} {'records':>11s} {'checked':>11s} {'decoded':>11s} {'threads':>7s} {'time s':>8s} "
          f"{'images/s':>10s} {'MB/s':>7s}")

    def row(name, r, threads):
        print(f"{name:44s} {r['records']:11,d} {r['checked']:11,d} {r['decoded']:11,d} {threads:7d} {r['s']:8.2f} "
              f"{r['checked'] / max(r['s'], 1e-9):10,.0f} {r['bytes'] / max(r['s'], 1e-9) / 1e6:7.0f}")

    for r, (cold, warm) in dec.items():
        row(f"rank {r} of {R}, epoch-0 share, cold (1x1)", cold, T)
        row(f"rank {r} of {R}, epoch-0 share, warm (key only)", warm, T)
    key_all = run_rank(a, 0, "keyall", threads=T)  # the store holds every verdict of the ranks above
    row(f"whole file, content key only ({n:,} records)", key_all, T)
    gb_s = key_all["bytes"] / max(key_all["s"], 1e-9) / 1e9
    web = 42e6 * 2900 / 1e9
    print(f"content key at 42M: {'measured' if n == 42_000_000 else 'extrapolated'} here "
          f"{key_all['s'] * 42e6 / n:.1f} s for this file ({key_all['bytes'] * 42e6 / n / 1e9:.1f} GB); "
          f"for WebFace42M's ~{web:.0f} GB at the measured {gb_s:.2f} GB/s on {T} threads: {web / gb_s:.0f} s per "
          f"node, {web / gb_s / R:.0f} s per rank of {R} (read from the page cache here; storage may be slower)")
    if a.decode_sample <= 0:
        return
    real = a.dir / "real"
    mean = write_real(real, a.decode_sample)
    print(f"real-size images: {a.decode_sample:,} records of 112x112 JPEG, mean {mean:,.0f} B a record")
    rates = {}
    for threads in sorted({1, T}):
        shutil.rmtree(store, ignore_errors=True)
        cold = run_rank(a, 0, "decode", threads=threads, data="real", ranks=1)
        warm = run_rank(a, 0, "decode", threads=threads, data="real", ranks=1)
        row("112x112 JPEG, rank 0 of 1, cold", cold, threads)
        row("112x112 JPEG, rank 0 of 1, warm (key only)", warm, threads)
        rates[threads] = (cold["checked"] / cold["s"], warm["checked"] / warm["s"])
    per_rank = n // R
    for threads, (c, w) in rates.items():
        print(f"{'N/R real images per rank (est.)':44s} {per_rank:11,d} {'':11s} {threads:7d} "
              f"cold {per_rank / c:8.0f} s, warm {per_rank / w:6.1f} s  (rate above x N/R; extrapolated)")
    print("The DALI loader runs this pass ahead of its reader in the first epoch (a batch waits only for the "
          "records DALI can draw for it); training is delayed only while it consumes images faster than "
          "the pass checks them. `data_tools validate` does the whole pass once on all cores.")


# --------------------------------------------------------------------------- read pattern, mixing
def dali_labels(rec: Path, idx: Path, batch: int, buffer: int, batches: int, seed: int) -> np.ndarray:
    """Labels in the order DALI's mxnet reader + initial_fill buffer delivers them (CPU, no decode)."""
    import nvidia.dali

    fn: Any = nvidia.dali.fn  # DALI's operators are generated at import time (no type stubs)
    pipeline_def: Any = nvidia.dali.pipeline_def  # pyright: ignore[reportPrivateImportUsage]

    @pipeline_def
    def pipe():
        _, labels = fn.readers.mxnet(path=[str(rec)], index_path=[str(idx)], random_shuffle=True,
                                     initial_fill=buffer, pad_last_batch=True, name="Reader")
        return labels

    p = pipe(batch_size=batch, num_threads=1, device_id=None, seed=seed)
    p.build()
    out = []
    for _ in range(batches):
        (lab,) = p.run()
        out.append(np.asarray(lab.as_tensor())[:, 0])
    del p
    return np.concatenate(out).astype(np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2_000_000, help="records (42000000 for WebFace42M)")
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--images-per-id", type=int, default=20, help="WebFace42M: ~21")
    ap.add_argument("--block-bytes", type=int, default=plan.DEFAULT_BLOCK_BYTES)
    ap.add_argument("--like-record-bytes", type=int, default=2900,
                    help="size the blocks in records as for real records of this size (WebFace42M: ~2.9 kB)")
    ap.add_argument("--old-ranks", type=int, default=2,
                    help="simulated ranks for the former whole index (its cost does not depend on the rank)")
    ap.add_argument("--block-images", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--buffer", type=int, default=8192, help="shuffle buffer (DALI initial_fill, torch window)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--old-max-n", type=int, default=4_000_000,
                    help="run the former whole-index epoch start only up to this N (11 GB per rank at 42M)")
    ap.add_argument("--old-scan-sample", type=int, default=200_000)
    ap.add_argument("--rank-sample", type=int, default=0, help="simulate only this many ranks (0: all)")
    ap.add_argument("--mix-batches", type=int, default=200)
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir, removed)")
    ap.add_argument("--payload", choices=("jpeg", "tiny"), default="jpeg",
                    help="jpeg: a decodable 1x1 JPEG (192-byte records): the DALI loader and decode check "
                         "rows run; tiny: 4 bytes (36-byte records), label scan and plan rows only")
    ap.add_argument("--decode-ranks", type=int, default=1,
                    help="ranks whose decode pass is run at N (cold and warm; each a fresh process)")
    ap.add_argument("--decode-threads", type=int, default=2, help="threads of the decode pass at N")
    ap.add_argument("--decode-sample", type=int, default=20_000,
                    help="real-size 112x112 JPEG records for the decode rate (0: skip)")
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--data", default="data", help=argparse.SUPPRESS)
    ap.add_argument("--rec-bytes", type=int, default=REC_BYTES, help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--what", default="new-dali", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    own_dir = a.dir is None
    a.dir = Path(a.dir or tempfile.mkdtemp(prefix="unpg-data-scale-"))
    try:
        report(a)
    finally:
        if own_dir:
            import shutil

            shutil.rmtree(a.dir, ignore_errors=True)


def report(a) -> None:
    n, R, B = a.n, a.ranks, a.batch
    a.block_images = max(1, a.block_bytes // a.like_record_bytes)
    print(f"N={n:,} records ({a.payload} payload), {R} ranks, batch {B}, block {a.block_bytes / 2**20:.1f} MiB "
          f"= {a.block_images:,} records of {a.like_record_bytes} B, "
          f"buffer {a.buffer}, {a.images_per_id} images/identity in identity order; "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    data = a.dir / "data"
    payload = jpeg_1x1() if a.payload == "jpeg" else PAYLOAD
    t_write = write_synthetic(data, n, a.images_per_id, payload)
    a.rec_bytes = len(encode_record(pack(IRHeader(0, 0.0), payload)))
    rec = data / "train.rec"
    print(f"wrote {rec.stat().st_size / 2**20:.0f} MiB .rec + {(data / 'train.idx').stat().st_size / 2**20:.0f} MiB "
          f".idx in {t_write:.1f} s")

    # ---- label scan
    offsets = np.arange(n, dtype=np.int64) * a.rec_bytes
    nc = (n - 1) // a.images_per_id + 1
    os.environ["UNPG_DATA_CACHE"] = str(a.dir / "cache")
    t = time.perf_counter()
    ds = FaceRecDataset(data)
    t_open = time.perf_counter() - t
    t = time.perf_counter()
    labels = ds.scan(progress=False)
    t_scan = time.perf_counter() - t
    assert np.array_equal(labels, np.arange(n) // a.images_per_id)
    t = time.perf_counter()
    FaceRecDataset(data).scan(progress=False)
    t_cached = time.perf_counter() - t
    del ds
    m = min(n, a.old_scan_sample)
    t_old = old_scan(rec, offsets[:m], nc) * n / m
    print("\n== label scan (page cache, one process)")
    print(f"{'':34s} {'seconds':>9s} {'records/s':>12s}")
    print(f"{'former per-record loop (est.)':34s} {t_old:9.2f} {n / t_old:12,.0f}   (timed on {m:,}, x N/{m:,})")
    print(f"{'vectorised scan_labels, first':34s} {t_scan:9.2f} {n / t_scan:12,.0f}   {t_old / t_scan:.1f}x faster")
    print(f"{'second process: open + cached':34s} {t_cached:9.2f}   (open alone: {t_open:.2f} s, numpy .idx parse)")
    print(
        f"{'42M measured' if n == 42_000_000 else '42M extrapolated (linear)'}: "
        f"first scan {t_scan * 42e6 / n:.0f} s (goal <= 60 s), "
        f"former loop {t_old * 42e6 / n:.0f} s"
    )

    # ---- per-rank epoch start
    ranks = list(range(R)) if not a.rank_sample else list(range(min(R, a.rank_sample)))
    print(f"\n== epoch start per rank (fresh process per rank; ranks {ranks[0]}..{ranks[-1]} of {R})")
    rows = {}
    whats = ["new-dali", "new-torch"] + (["old"] if n <= a.old_max_n else [])
    try:
        import nvidia.dali  # noqa: F401

        dali = a.payload == "jpeg"
    except ImportError:
        dali = False
    for what in whats:
        rows[what] = [run_rank(a, r, what) for r in (ranks if what.startswith("new") else ranks[:a.old_ranks])]
    store = a.dir / "cache" / "decode-verdicts"
    dec_ranks = ranks[:max(0, a.decode_ranks)] if dali else []
    dec = {}
    if dali:
        import shutil

        rows["loader, verdicts cold"], rows["loader, verdicts warm"] = [], []
        for r in ranks:
            shutil.rmtree(store, ignore_errors=True)  # no verdicts: the gate waits for the first chunks
            rows["loader, verdicts cold"].append(run_rank(a, r, "loader", threads=a.decode_threads))
            if r in dec_ranks:  # the rank's whole epoch-0 decode pass, cold then warm
                shutil.rmtree(store, ignore_errors=True)
                dec[r] = (run_rank(a, r, "decode", threads=a.decode_threads),
                          run_rank(a, r, "decode", threads=a.decode_threads))
                rows["loader, verdicts warm"].append(run_rank(a, r, "loader", threads=a.decode_threads))
        if not rows["loader, verdicts warm"]:
            del rows["loader, verdicts warm"]
    print(f"{'path':28s} {'time s (max)':>12s} {'extra RSS MiB (max)':>20s} {'index MiB/rank':>15s}")
    for what, rs in rows.items():
        print(f"{what:28s} {max(r['s'] for r in rs):12.2f} {max(r['extra_mb'] for r in rs):20.0f} "
              f"{np.mean([r['index_bytes'] for r in rs]) / 2**20:15.2f}")
    if dali:
        lc = rows["loader, verdicts cold"]
        print(f"('loader': DaliFaceLoader at image_size 1x1 (what build_train_loader(backend='dali') builds) with "
              f"labels cached: .idx parse, cached labels, plan, the epoch's rank index (build: max "
              f"{max(r['build_s'] for r in lc):.2f} s), DALI pipeline and first batch {lc[0]['first_batch']}, "
              f"the decode check running ahead on {a.decode_threads} threads (cold: no verdicts, the first "
              "batch waits for the chunks DALI can draw it from; warm: after the rank's decode pass); "
              "DALI/torch libraries loaded before the baseline; of the RSS, "
              f"{lc[0]['file_mb']:.0f} MiB at the end are file-backed pages (the memory-mapped "
              "index and label caches, shared by the ranks of a node))")
    elif a.payload == "tiny":
        print("(no DALI loader rows: --payload tiny records are not images, the decode check refuses them)")
    new = rows["new-dali"]
    whole_bytes = sum(r["index_bytes"] for r in new) * (R / len(ranks))  # the old index = all ranks' lines
    print(
        f"index bytes per rank: new {np.mean([r['index_bytes'] for r in new]) / 2**20:.2f} MiB vs former "
        f"whole index {whole_bytes / 2**20:.2f} MiB "
        f"(ratio {np.mean([r['index_bytes'] for r in new]) / whole_bytes:.3f}, "
        f"goal <= 1/{R} = {1 / R:.3f})"
    )
    scale = 42e6 / n
    if "old" in rows:
        old = rows["old"]
        print(f"former / new (DALI): time {max(r['s'] for r in old) / max(r['s'] for r in new):.1f}x, "
              f"extra RSS {max(r['extra_mb'] for r in old) / max(1, max(r['extra_mb'] for r in new)):.1f}x")
        print(f"42M extrapolated (linear): former {max(r['s'] for r in old) * scale:.0f} s / "
              f"{max(r['extra_mb'] for r in old) * scale / 1024:.1f} GB per rank")
    else:
        print(f"former whole index not run (N > --old-max-n={a.old_max_n:,})")
    print(
        f"{'42M measured' if n == 42_000_000 else '42M extrapolated (linear)'}: "
        f"new DALI {max(r['s'] for r in new) * scale:.1f} s / "
        f"{max(r['extra_mb'] for r in new) * scale / 1024:.2f} GB per rank (goals <= 5 s, <= 1 GB)"
    )

    if dali:
        decode_report(a, dec, n, R)

    # ---- read pattern, rank 0, epoch 0
    per_rank = plan.batches_per_rank(n, R, B) * B
    K = a.block_images
    rp = plan.RankPlan(offsets, 0, R, per_rank, a.seed, True, "block", K)
    pos = rp.rank_positions(0)
    dali_order = np.sort(pos)  # offsets are increasing with the index here
    win = plan.window_shuffle(pos, min(a.buffer, per_rank), np.random.default_rng([a.seed, 0, 0, 0xB0FF]))
    torch_new = np.sort(win.reshape(-1, B), axis=1).reshape(-1)  # each batch read in byte order
    glob = plan.RankPlan(offsets, 0, R, per_rank, a.seed, True, "global").rank_positions(0)
    old_dali = np.arange(per_rank)  # former: whole selection sorted, contiguous shard of it
    sizes = np.full(per_rank, a.rec_bytes)
    print(f"\n== read pattern, rank 0, epoch 0 ({per_rank:,} reads; block = {K:,} records)")
    print(f"{'reads issued by':36s} {'increasing':>10s} {'in block':>9s} {'records/seek':>13s}")
    for name, order in [
        ("new DALI (block, index sorted)", dali_order),
        ("new torch (block+window, batch sorted)", torch_new),
        ("torch global shuffle (former torch)", glob),
        ("former DALI (contiguous shard)", old_dali),
    ]:
        st = plan.read_pattern(offsets[order], sizes, block_of=order // K)
        print(f"{name:36s} {st['increasing']:10.3f} {st['increasing_in_block']:9.3f} "
              f"{st['bytes_per_seek'] / a.rec_bytes:13.1f}")

    # ---- mixing, rank 0
    nb = min(a.mix_batches, per_rank // B)
    print(f"\n== mixing, rank 0, first {nb} batches of {B} (identity-sorted file, {a.images_per_id} images/id)")
    print(f"{'order':36s} {'ids/batch':>9s} {'repeat frac':>11s} {'x global':>9s}")
    ref = plan.batch_mixing(labels[glob[:nb * B]], B)
    res = [("global shuffle", ref), ("new torch: block + window", plan.batch_mixing(labels[win[:nb * B]], B)),
           ("block, no buffer", plan.batch_mixing(labels[pos[:nb * B]], B))]
    try:
        idx = a.dir / "rank0.idx"
        write_index_arrays(idx, dali_order, offsets[dali_order])
        dl = dali_labels(rec, idx, B, min(a.buffer, per_rank), nb, a.seed)
        res.append(("new DALI: block + initial_fill", plan.batch_mixing(dl, B)))
    except ImportError:
        print("(nvidia-dali not installed: DALI mixing not measured)")
    for name, st in res:
        print(f"{name:36s} {st['identities_per_batch']:9.1f} {st['repeat_fraction']:11.3f} "
              f"{st['identities_per_batch'] / ref['identities_per_batch']:9.3f}")


if __name__ == "__main__":
    main()
