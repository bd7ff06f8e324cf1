"""Benchmark of the UNPG term, sharded vs replicated, on CPU gloo ranks (not a test).

The UNPG term alone (similarities, quartiles, filter, log-sum-exp; forward and
backward to the L2-normalised global batch) for a global batch of N rows, D = 64,
float32, split evenly over R gloo ranks (one thread each), labels uniform over
N / 4 classes:

- sharded: ``sharded_metric_negatives_lse`` on every rank (what
  ``UNPG(sharded=None)`` runs when R > 1), with its collectives;
- replicated: ``metric_negatives_lse`` as every rank computed it before: the
  same work on every rank, so it is measured on rank 0 alone while the other
  ranks wait (R copies of it do not fit this machine's memory at N = 16k).

Both sides start from the same gathered batch (a leaf tensor): the all-gather
and its backward are shared with the softmax and not charged to either.

Per rank: memory = peak RSS during the term (VmHWM, reset right before) minus
the RSS before it, with glibc's mmap threshold fixed at 128 KiB so freed blocks
leave the RSS; time = CPU time of the rank's thread (median of --repeat runs).
CPU time, not wall time: the R sharded ranks share this machine's cores, which
on a cluster they would not; a rank blocked in a collective uses no CPU time.
Sharded figures are the maximum over the ranks.

    python -m bench.unpg                      # N in {2k, 8k} x R in {4, 8}, series at B = 1024
    python -m bench.unpg --sizes 16384 --worlds 8 --no-series   # the goal point (~5 GB on rank 0)
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import spawn

from bench.memory import reset_peak, status_kb

DIM, S, WISK = 64, 64.0, 1.5


def _batch(n_rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, int(os.environ.get("BENCH_UNPG_DIM", DIM)), generator=g)
    labels = torch.randint(0, max(1, n_rows // 4), (n_rows,), generator=g)
    return x, labels


def _term(mode: str, x: torch.Tensor, labels: torch.Tensor, sizes) -> None:
    import torch.nn.functional as F

    from trainer.collectives import scale_grad
    from trainer.heads.unpg import metric_negatives_lse, sharded_metric_negatives_lse

    leaf = x.clone().requires_grad_(True)
    x_hat = F.normalize(leaf, dim=1)
    if mode == "sharded":
        v, _ = sharded_metric_negatives_lse(x_hat, labels, sizes, S, WISK)
    else:
        v, _ = metric_negatives_lse(x_hat, labels, S, WISK)
        v = scale_grad(v, 1.0 / len(sizes))
    v.backward()


def _measure(mode, x, labels, sizes, repeat):
    """(peak MB above the RSS before, median CPU seconds, median wall seconds)."""
    peak, cpu, wall = None, [], []
    for i in range(repeat):
        base = status_kb("VmRSS")
        reset_peak()
        c0, w0 = time.thread_time(), time.perf_counter()
        _term(mode, x, labels, sizes)
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
        if i == 0:
            peak = (status_kb("VmHWM") - base) / 1024
    return peak, statistics.median(cpu), statistics.median(wall)


def _rank(rank, world, store, compare_sizes, series_size, repeat, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        # Warm-up at a small size: lazily loaded kernels are not charged to the term.
        wx, wl = _batch(64 * world, seed=1)
        _term("sharded", wx, wl, [64] * world)
        if rank == 0 and compare_sizes:
            _term("replicated", wx, wl, [64] * world)
        result = {}
        for n_rows, replicated in [(n, True) for n in compare_sizes] + ([(series_size, False)] if series_size else []):
            sizes = [n_rows // world + (1 if r < n_rows % world else 0) for r in range(world)]
            x, labels = _batch(n_rows)
            dist.barrier()
            point = {"sharded": _measure("sharded", x, labels, sizes, repeat)}
            dist.barrier()
            if rank == 0 and replicated:
                point["replicated"] = _measure("replicated", x, labels, sizes, repeat)
            dist.barrier()
            result[(n_rows, replicated)] = point
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_world(world: int, compare_sizes, series_size, repeat: int) -> dict:
    """One gloo world of ``world`` ranks: {(N, compared): {"sharded": max over ranks, "replicated": rank 0}}."""
    with tempfile.TemporaryDirectory() as tmp:
        spawn(_rank, args=(world, f"{tmp}/store", list(compare_sizes), series_size, repeat, tmp),
                 nprocs=world, join=True)
        results = [torch.load(f"{tmp}/rank{r}.pt", weights_only=False) for r in range(world)]
    points = {}
    for key in results[0]:
        sharded = [r[key]["sharded"] for r in results]
        points[key] = {"sharded": tuple(max(v[i] for v in sharded) for i in range(3))}
        if "replicated" in results[0][key]:
            points[key]["replicated"] = results[0][key]["replicated"]
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192], help="global batches N")
    parser.add_argument("--worlds", type=int, nargs="+", default=[4, 8], help="rank counts R")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per point (median)")
    parser.add_argument("--series-batch", type=int, default=1024, help="B_local of the sharded series")
    parser.add_argument("--series-worlds", type=int, nargs="+", default=[2, 4, 8],
                        help="rank counts of the series (N = R x B_local)")
    parser.add_argument("--no-series", action="store_true")
    parser.add_argument("--no-compare", action="store_true", help="skip the sharded vs replicated grid")
    parser.add_argument("--dim", type=int, default=DIM, help="embedding size D")
    args = parser.parse_args()
    os.environ["BENCH_UNPG_DIM"] = str(args.dim)  # read by the spawned ranks
    # Freed blocks above 128 KiB go back to the OS, so the RSS follows what is live.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    compare = [] if args.no_compare else args.sizes
    series = [] if args.no_series else args.series_worlds
    b = args.series_batch
    points = {}
    for world in sorted(set(args.worlds if compare else []) | set(series)):
        sizes = compare if world in args.worlds else []
        points[world] = run_world(world, sizes, b * world if world in series else 0, args.repeat)
    if compare:
        print(f"UNPG term, D={args.dim}, float32, forward+backward; per rank (sharded: max over ranks)")
        print(f"{'R':>3} {'N':>6} {'pairs':>11} | {'sharded MB':>10} {'cpu s':>7} | "
              f"{'replicated MB':>13} {'cpu s':>7} | {'mem ratio':>9} {'time ratio':>10}")
        for world in args.worlds:
            for n_rows in compare:
                p = points[world][(n_rows, True)]
                (sm, sc, _), (rm, rc, _) = p["sharded"], p["replicated"]
                print(f"{world:>3} {n_rows:>6} {n_rows * (n_rows - 1) // 2:>11} | {sm:>10.1f} {sc:>7.3f} | "
                      f"{rm:>13.1f} {rc:>7.3f} | {sm / rm:>9.3f} {sc / rc:>10.3f}")
                nn_mb = n_rows * n_rows * 4 / 2**20
                print(f"    sharded peak per rank / one N x N float32 matrix ({nn_mb:.0f} MB): {sm / nn_mb:.3f}"
                      + (" (goal <= 1.0: " + ("ok" if sm <= nn_mb else "MISSED") + ")" if n_rows == 4096 else ""))
    if series:
        print(f"\nsharded series at B_local={b}: per-rank cost grows linearly in N = R x B_local")
        print("(memory: the [B, B + N/2] band grows with N; the chunk temporaries of 2^20 elements do not)")
        print(f"{'R':>3} {'N':>6} | {'MB':>8} {'cpu s':>7} | {'us / N':>8} {'dMB / dN x1000':>14} {'d us / dN':>9}")
        prev = None
        for world in series:
            n_rows = world * b
            sm, sc, _ = points[world][(n_rows, False)]["sharded"]
            slope = (
                ""
                if prev is None
                else f"{1000 * (sm - prev[1]) / (n_rows - prev[0]):>14.3f} "
                f"{1e6 * (sc - prev[2]) / (n_rows - prev[0]):>9.1f}"
            )
            print(f"{world:>3} {n_rows:>6} | {sm:>8.1f} {sc:>7.3f} | {1e6 * sc / n_rows:>8.1f} {slope}")
            prev = (n_rows, sm, sc)


if __name__ == "__main__":
    main()
