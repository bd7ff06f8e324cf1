"""Data loader throughput: DALI CPU pipeline vs torch fallback vs bare decode (the ceiling).

    python -m bench.data [--identities 200 --images-per-identity 20 --threads 2 --batch-size 128]

Generates the synthetic dataset (112x112 JPEGs) once under --data, then, in one
run with the same thread count: a decode-only loop (simplejpeg over the same
record payloads already in memory, ``threads`` threads), the DALI CPU pipeline
(read, decode, flip, uint8 NHWC torch tensors) and the torch DataLoader
fallback (``threads`` worker processes), plus a bare loop that decodes into a
uint8 batch and flips (what the loaders deliver; the cast and normalisation to
float happen on the training device) on the same threads. Prints images/s and
ratios to the decode-only rate. Target: the default loader >= 0.8x decode-only.
"""
from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import simplejpeg
import torch


def decode_only(payloads, threads: int, rounds: int) -> float:
    chunks = [payloads[i::threads] for i in range(threads)]

    def work(chunk):
        for p in chunk:
            simplejpeg.decode_jpeg(p, colorspace="RGB")
        return len(chunk)

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(work, [c[:50] for c in chunks]))  # warm up
        t = time.perf_counter()
        n = 0
        for _ in range(rounds):
            n += sum(ex.map(work, chunks))
        return n / (time.perf_counter() - t)


def decode_flip(payloads, threads: int, rounds: int, batch: int) -> float:
    """Bare loop producing what the loaders produce: decode into a uint8 batch, flip."""
    batches = [payloads[i:i + batch] for i in range(0, len(payloads) - batch + 1, batch)]

    def work(chunk):
        for b in chunk:
            out = np.empty((len(b), 112, 112, 3), np.uint8)
            for j, p in enumerate(b):
                simplejpeg.decode_jpeg(p, colorspace="RGB", buffer=out[j])
            out[::2] = out[::2, :, ::-1]
        return sum(len(b) for b in chunk)

    chunks = [batches[i::threads] for i in range(threads)]
    with ThreadPoolExecutor(threads) as ex:
        t = time.perf_counter()
        n = 0
        for _ in range(rounds):
            n += sum(ex.map(work, chunks))
        return n / (time.perf_counter() - t)


def loader_rate(data, backend: str, threads: int, batch: int, epochs: int) -> float:
    from trainer.data import build_train_loader

    L = build_train_loader(data, batch, backend=backend, num_threads=threads, seed=0)
    L.set_epoch(0)
    for _i, _ in enumerate(L):  # warm-up epoch (pipeline build, worker start, page cache)
        pass
    n = 0
    t = time.perf_counter()
    for e in range(1, epochs + 1):
        L.set_epoch(e)
        for _x, y in L:
            n += y.numel()
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="bench_out/data_synth")
    ap.add_argument("--identities", type=int, default=200)
    ap.add_argument("--images-per-identity", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds; best per pipeline is reported")
    a = ap.parse_args()
    torch.set_num_threads(1)
    data = Path(a.data)
    if not (data / "train.rec").is_file():
        from data_tools.synth import generate_dataset

        print(f"generating {a.identities}x{a.images_per_identity} synthetic images in {data} ...")
        generate_dataset(data, a.identities, a.images_per_identity, seed=0, val_pairs=0, val_identities=0)
    from trainer.data import DEFAULT_CPU_BACKEND, resolve_backend
    from trainer.data.face_rec import FaceRecDataset

    ds = FaceRecDataset(data)
    payloads = [ds.read_image(int(k))[1] for k in ds.image_keys]
    print(f"{len(payloads)} images of 112x112, {np.mean([len(p) for p in payloads]) / 1e3:.1f} kB mean JPEG; "
          f"threads={a.threads}, batch={a.batch_size}, cores={os.cpu_count()}")
    backends = ["torch"] + (["dali"] if resolve_backend("auto", torch.device("cuda")) == "dali" else [])
    rates = {}
    # interleaved rounds, best of --repeat per pipeline: the machine is shared, a
    # neighbour's burst should not decide a ratio
    for r in range(a.repeat):
        got = {"decode-only (simplejpeg)": decode_only(payloads, a.threads, a.epochs),
               "decode+flip bare (uint8)": decode_flip(payloads, a.threads, a.epochs, a.batch_size)}
        for b in backends:
            got[f"{b} loader"] = loader_rate(data, b, a.threads, a.batch_size, a.epochs)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.0f}" for k, v in got.items()))
        for k, v in got.items():
            rates[k] = max(rates.get(k, 0.0), v)
    base = rates["decode-only (simplejpeg)"]
    print(f"best of {a.repeat} rounds (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(f"{'pipeline':28s} {'images/s':>10s} {'x decode-only':>14s}")
    for k, v in rates.items():
        print(f"{k:28s} {v:10.0f} {v / base:14.2f}")
    default = resolve_backend("auto", torch.device("cpu"))
    print(f"default CPU backend (backend='auto'): {default} (DEFAULT_CPU_BACKEND={DEFAULT_CPU_BACKEND!r}); "
          f"ratio {rates[f'{default} loader'] / base:.2f} (target >= 0.80)")


if __name__ == "__main__":
    main()
