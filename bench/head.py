"""Benchmark of the Partial FC + UNPG head on CPU (not a test).

Two gloo ranks, one thread each, global batch 512, D 512, ArcFace, SGD with
momentum 0.9 and weight decay 5e-4; C in {100k, 1M}, sample rate in {1.0, 0.1},
UNPG on/off. Baseline, measured in the same run with the same shapes and
processes: a dense-gradient Partial FC written here from its description (the
design of insightface's PartialFC_V2): each rank's shard is one dense
parameter; the sampled rows are gathered by indexing, so autograd produces a
full-shard dense gradient, and torch.optim.SGD updates momentum and weights of
every row of the shard each step; the softmax across shards uses torch's
differentiable collectives. Every configuration runs in fresh processes.

Per-step time = forward + backward + optimizer step, median over the timed
steps, the slower rank. Memory = peak RSS of a rank (VmHWM, reset right
before the steps) minus its RSS before the head was built: what the head,
its optimizer state and the step's temporaries cost.

    python -m bench.head                 # the full grid (~5-10 min on 2 cores)
    python -m bench.head --classes 100000 --steps 2
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

from bench.memory import peak_mb, reset_peak, rss_mb

BATCH, DIM = 512, 512


def _warm_up(UNPG, ArcFace, PartialFC, PartialFCSGD, rate, unpg_on, local) -> None:
    """One step of a tiny head first, so lazily loaded kernels and communication
    buffers are part of the baseline and not charged to the head."""
    head = PartialFC(ArcFace(s=64.0, m=0.5), DIM, 4000, sample_rate=rate, unpg=UNPG() if unpg_on else None)
    opt = PartialFCSGD(head)
    emb = torch.randn(local, DIM, requires_grad=True)
    head(emb, torch.randint(0, 4000, (local,))).backward()
    opt.step()


def _partial_fc_rank(rank, world, store, classes, rate, unpg_on, steps, threads, state_dtype, out):
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    from trainer.heads import STATE_DTYPES, UNPG, ArcFace, PartialFC, PartialFCSGD

    torch.manual_seed(rank)
    local = BATCH // world
    _warm_up(UNPG, ArcFace, PartialFC, PartialFCSGD, rate, unpg_on, local)
    base = rss_mb()
    head = PartialFC(ArcFace(s=64.0, m=0.5), DIM, classes, sample_rate=rate,
                     unpg=UNPG(wisk=1.5) if unpg_on else None, dtype=STATE_DTYPES[state_dtype])
    opt = PartialFCSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    state_mb = (head.num_local * head.state_bytes_per_class) / 2**20  # shard + momentum buffer
    emb = torch.randn(local, DIM, requires_grad=True)
    times = []
    reset_peak()
    for step in range(steps + 1):
        labels = torch.randint(0, classes, (local,))
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        emb.grad = None
        loss = head(emb, labels)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        if step:  # the first step is warm-up
            times.append(dt)
    torch.save(dict(time=statistics.median(times), mem=peak_mb() - base, state=state_mb,
                    kept=head.last_stats.get("kept"), bpc=head.state_bytes_per_class), f"{out}/r{rank}.pt")
    dist.destroy_process_group()


class _DenseGradPartialFC(torch.nn.Module):
    """Baseline: Partial FC with a dense shard gradient (PartialFC_V2's design, written
    from its description): all-gather embeddings and labels, sample positives + random
    classes of the shard, ``weight[index]`` (dense gradient on backward), ArcFace on the
    target logit, cross-entropy across shards with differentiable all-reduces."""

    def __init__(self, classes: int, rate: float, rank: int, world: int, s: float = 64.0, m: float = 0.5):
        super().__init__()
        from trainer.collectives import class_range

        self.start, self.stop = class_range(classes, rank, world)
        self.num_local = self.stop - self.start
        self.num_sample = int(rate * self.num_local)
        self.rate, self.s, self.m = rate, s, m
        # empty() follows ``with torch.device(...)``; torch.normal(mean, std, size) ignores it (CPU)
        self.weight = torch.nn.Parameter(torch.empty(self.num_local, DIM).normal_(0, 0.01))

    def forward(self, local_emb: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        import torch.distributed.nn.functional as dnn

        emb = torch.cat(dnn.all_gather(local_emb))
        labels = torch.cat([torch.empty_like(local_labels) for _ in range(dist.get_world_size())])
        dist.all_gather(list(labels.chunk(dist.get_world_size())), local_labels)
        in_shard = (labels >= self.start) & (labels < self.stop)
        local_lab = torch.where(in_shard, labels - self.start, torch.full_like(labels, -1))
        if self.rate < 1:
            dev = self.weight.device
            pos = torch.unique(local_lab[in_shard])
            score = torch.rand(self.num_local, device=dev)
            score[pos] = 2.0
            index = torch.topk(score, max(self.num_sample, pos.numel()))[1].sort()[0]
            remap = torch.full((self.num_local,), -1, dtype=torch.long, device=dev)
            remap[index] = torch.arange(index.numel(), device=dev)
            local_lab = torch.where(in_shard, remap[local_lab.clamp(min=0)], local_lab)
            weight = self.weight[index]
        else:
            weight = self.weight
        cos = torch.nn.functional.normalize(emb) @ torch.nn.functional.normalize(weight).t()
        cos = cos.clamp(-1 + 1e-7, 1 - 1e-7)
        rows = torch.nonzero(local_lab >= 0).squeeze(1)
        target = torch.cos(torch.acos(cos[rows, local_lab[rows]]) + self.m)
        logits = cos.index_put((rows, local_lab[rows]), target) * self.s
        mx = logits.detach().max(dim=1, keepdim=True)[0]
        dist.all_reduce(mx, op=dist.ReduceOp.MAX)
        sum_exp = dnn.all_reduce((logits - mx).exp().sum(dim=1))
        tgt = torch.zeros(emb.shape[0], device=emb.device).index_put((rows,), logits[rows, local_lab[rows]])
        tgt = dnn.all_reduce(tgt)
        return (sum_exp.log() + mx.squeeze(1) - tgt).mean()


def _dense_pfc_rank(rank, world, store, classes, rate, steps, threads, out):
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(rank)
    local = BATCH // world
    warm = _DenseGradPartialFC(4000, rate, rank, world)
    warm(torch.randn(local, DIM, requires_grad=True), torch.randint(0, 4000, (local,))).backward()
    del warm
    base = rss_mb()
    head = _DenseGradPartialFC(classes, rate, rank, world)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    state_mb = head.weight.numel() * 2 * 4 / 2**20
    emb = torch.randn(local, DIM, requires_grad=True)
    times = []
    reset_peak()
    for step in range(steps + 1):
        labels = torch.randint(0, classes, (local,))
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        emb.grad = None
        head(emb, labels).backward()
        opt.step()
        if step:
            times.append(time.perf_counter() - t0)
    torch.save(dict(time=statistics.median(times), mem=peak_mb() - base, state=state_mb), f"{out}/r{rank}.pt")
    dist.destroy_process_group()


def _spawn(target, args):
    with tempfile.TemporaryDirectory() as tmp:
        spawn(target, args=(2, f"{tmp}/store", *args, tmp), nprocs=2)
        ranks = [torch.load(f"{tmp}/r{r}.pt") for r in range(2)]
    return dict(time=max(r["time"] for r in ranks), mem=max(r["mem"] for r in ranks),
                state=max(r["state"] for r in ranks), bpc=ranks[0].get("bpc", 2 * DIM * 4))


def _run_partial_fc(classes, rate, unpg_on, steps, state_dtype="fp32"):
    return _spawn(_partial_fc_rank, (classes, rate, unpg_on, steps, 1, state_dtype))


def _run_dense(classes, rate, steps):
    return _spawn(_dense_pfc_rank, (classes, rate, steps, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.1])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after 1 warm-up)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense-gradient Partial FC baseline")
    ap.add_argument("--state-dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                    help="loss.state_dtype of ours (columns side by side)")
    ap.add_argument("--unpg", nargs="+", default=["off", "on"], choices=["off", "on"], help="UNPG settings of ours")
    ap.add_argument("--reserve-gb", type=float, default=40.0,
                    help="GPU memory kept for the backbone, activations and buffers in the fit line")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Freed blocks above 128 KiB go back to the OS, so the RSS follows what is live
    # (glibc's dynamic threshold would otherwise keep freed temporaries in the heap).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))

    rows = {}
    print(f"global batch {BATCH}, D {DIM}, ArcFace, SGD(momentum 0.9, wd 5e-4); 2 gloo ranks x 1 thread; "
          f"{args.steps} timed steps")
    print(f"{'config':<50}{'s/step':>9}{'peak MB/rank':>14}{'state MB/rank':>15}{'mem/state':>11}"
          f"{'state B/class':>15}")

    def show(name, r):
        print(f"{name:<50}{r['time']:>9.3f}{r['mem']:>14.0f}{r['state']:>15.0f}{r['mem'] / r['state']:>11.2f}"
              f"{r.get('bpc', 2 * DIM * 4):>15}", flush=True)

    for classes in args.classes:
        for rate in args.rates:
            if not args.no_dense:
                rows[(classes, rate, "dense")] = d = _run_dense(classes, rate, args.steps)
                show(f"C={classes:,} r={rate} dense-grad PFC (baseline)", d)
            for unpg_on in [u == "on" for u in args.unpg]:
                for sd in args.state_dtypes:
                    r = _run_partial_fc(classes, rate, unpg_on, args.steps, sd)
                    rows[(classes, rate, unpg_on, sd)] = r
                    if sd == args.state_dtypes[0]:
                        rows[(classes, rate, unpg_on)] = r
                    show(f"C={classes:,} r={rate} ours UNPG {'on' if unpg_on else 'off'} state {sd}", r)

    print("\nratios (same run, same shapes and processes)")
    for classes in args.classes:
        for rate in args.rates:
            on, off, dense = (rows.get((classes, rate, k)) for k in (True, False, "dense"))
            if on and off:
                print(f"  C={classes:,} r={rate}: ours UNPG on/off step time {on['time'] / off['time']:.3f}")
            if dense and off:
                speed, mem = dense["time"] / off["time"], off["mem"] / dense["mem"]
                goal = ""
                if classes >= 1_000_000 and rate <= 0.1:
                    goal = (f"  (goal >= 3x: {'ok' if speed >= 3 else 'MISSED'}; "
                            f"<= 0.55x memory: {'ok' if mem <= 0.55 else 'MISSED'})")
                print(f"  C={classes:,} r={rate}: dense-grad PFC / ours (UNPG off) step time {speed:.2f}x, "
                      f"ours / dense peak memory {mem:.2f}x{goal}")
            if dense and on:
                print(f"  C={classes:,} r={rate}: dense-grad PFC (no UNPG) / ours UNPG on step time "
                      f"{dense['time'] / on['time']:.2f}x, ours / dense peak memory {on['mem'] / dense['mem']:.2f}x")
        lo, hi = rows.get((classes, 0.1, False)), rows.get((classes, 1.0, False))
        if lo and hi:
            ratio = lo["time"] / hi["time"]
            print(f"  C={classes:,}: ours r=0.1 / r=1.0 step time {ratio:.3f}"
                  + (f" (goal <= 0.11: {'ok' if ratio <= 0.11 else 'MISSED'})" if classes >= 1_000_000 else ""))
        if lo:
            print(f"  C={classes:,}: ours r=0.1 peak memory / (shard + optimizer state) {lo['mem'] / lo['state']:.3f}")
        _state_table(rows, classes, args)
    _fit_line(rows, args)


def _state_table(rows, classes, args) -> None:
    """fp32 and bf16 state side by side: bytes per class, peak / state (goal <= 1.15 at r=0.1)."""
    if len(args.state_dtypes) < 2 and not any((classes, r, "dense") in rows for r in args.rates):
        return
    print(f"  C={classes:,} state dtypes side by side (ours; dense baseline: fp32 weight + fp32 momentum):")
    for rate in args.rates:
        for unpg_on in [u == "on" for u in args.unpg]:
            cells = []
            for sd in args.state_dtypes:
                r = rows.get((classes, rate, unpg_on, sd))
                if r:
                    goal = (
                        f" (goal <= 1.15: {'ok' if r['mem'] / r['state'] <= 1.15 else 'MISSED'})" if rate <= 0.1 else ""
                    )
                    cells.append(f"{sd}: {r['bpc']} B/class, peak/state {r['mem'] / r['state']:.3f}{goal}, "
                                 f"{r['time']:.3f} s/step")
            d = rows.get((classes, rate, "dense"))
            if d:
                cells.append(
                    f"dense: {2 * DIM * 4} B/class, peak/state {d['mem'] / d['state']:.3f}, {d['time']:.3f} s/step"
                )
            print(f"    r={rate} UNPG {'on' if unpg_on else 'off'}: " + " | ".join(cells))


def _fit_line(rows, args) -> None:
    """Classes that fit one 141 GB H200 at r=0.1: (141 GB - reserve) / (bytes per class x peak/state),
    the peak/state measured here at the largest C run (per rank), per state dtype."""
    gpu = 141e9
    for sd in args.state_dtypes:
        pts = [(c, r) for (c, rate, u, s), r in ((k, v) for k, v in rows.items() if len(k) == 4)
               if s == sd and rate <= 0.1 + 1e-9 and u is False] if any(len(k) == 4 for k in rows) else []
        if not pts:
            continue
        c, r = max(pts, key=lambda t: t[0])
        ratio = r["mem"] / r["state"]
        per_gpu = (gpu - args.reserve_gb * 1e9) / (r["bpc"] * ratio)
        print(f"fit, state {sd}: {r['bpc']} B/class x peak/state {ratio:.3f} (C={c:,}, r=0.1, UNPG off) -> "
              f"{per_gpu / 1e6:.1f}M classes per 141 GB H200 after a {args.reserve_gb:.0f} GB reserve "
              f"(backbone, activations, buffers); x 8 = {8 * per_gpu / 1e6:.0f}M classes on 8 H200s")


if __name__ == "__main__":
    main()
