"""Elastic scale down and up under torchrun (two "nodes" x 2 workers, c10d on localhost).

Nodes A (store host) and B start ``unpg-launch multi --nnodes 1:2``; B (its launcher, torchrun
and workers) is killed with SIGKILL before step 6; A re-rendezvouses alone and continues at
world size 2 from the newest complete checkpoint (step 4) with grad_accum 2 (the global batch
16 kept); at step 10 a third node C joins: the agents restart the group (the workers save at
step 11, not a checkpoint step, on torchrun's SIGTERM) and it finishes at world size 4 with grad_accum 1. Asserted: the
run finishes, every image of the two epochs with a change is used exactly once (the loader's
own indices, recorded per micro-batch), the step count and lr schedule continue, the
checkpoints hold all classifier rows at each world size."""
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict

import pytest

from tests.launch.e2e import ROOT, checkpoint_meta, free_port, reaped, step_lines, tiny_config

TOTAL, EVERY, FAULT, GROW = 24, 2, 5, 10  # 128 images / global batch 16: 8 steps per epoch


def _node(tmp_path, name, port, cfg, host, env):
    # --last-call-timeout 10: A and B start together and form one 4-rank round even on a loaded
    # machine (a round with MAX nodes closes at once); after the kill A waits 10 s for B
    cmd = [sys.executable, "-m", "launch", "multi", "--nnodes", "1:2", "--nproc-per-node", "2",
           "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"elastic-{port}", "--rdzv-host", host,
           "--last-call-timeout", "10", "--join-timeout", "120", "--keep-alive-interval", "1",
           "--shutdown-timeout", "60", "--max-restarts", "3",
           "--module", "tests.launch.elastic_worker", "--", str(cfg), "data.batch_size=4"]
    f = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT), f


def _wait_for(path, procs, what, timeout=240):
    deadline = time.time() + timeout
    while not path.exists():
        if any(p.poll() is not None for p, _ in procs) or time.time() > deadline:
            pytest.fail(f"{what} never happened")
        time.sleep(0.1)



def _id_records(ids):
    """Every micro-batch the workers served: (resumed-at step, step, epoch, world, accum, image ids)."""
    recs = []
    for f in ids.glob("ids-*"):
        for line in f.read_text().split("\n"):
            if line:
                start, step, epoch, world, accum, *idx = map(int, line.split())
                recs.append((start, step, epoch, world, accum, idx))
    return recs

def test_lose_a_node_then_grow_back_same_global_batch_each_image_once(tmp_path, tiny_dataset):
    output = tmp_path / "run"
    cfg = tiny_config(tmp_path / "cfg.yaml", tiny_dataset, output, max_steps=TOTAL, save_every=EVERY)
    ids, fault = tmp_path / "ids", tmp_path / "fault"
    ids.mkdir()
    fault.mkdir()
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNPG_IDS_DIR": str(ids), "UNPG_FAULT_DIR": str(fault),
           "UNPG_GROW_STEP": str(GROW)}
    procs = [_node(tmp_path, "nodeA", port, cfg, "yes", env)]
    procs.append(_node(tmp_path, "nodeB", port, cfg, "no", {**env, "UNPG_NODE_FAULT_STEP": str(FAULT)}))
    with reaped(procs):
        try:
            _wait_for(fault / "node-ready", procs, "node B reaching the fault step")
            os.kill(procs[1][0].pid, signal.SIGKILL)  # its torchrun and workers die with it (PDEATHSIG)
            _wait_for(fault / "grow-ready", procs[:1], "the shrunk job reaching the grow step")
            procs.append(_node(tmp_path, "nodeC", port, cfg, "no", env))
            codes = [procs[0][0].wait(timeout=240), procs[2][0].wait(timeout=240)]
        finally:
            logs = "\n".join(f"--- {n}\n" + (tmp_path / f"{n}.log").read_text()[-3000:]
                             for n in ("nodeA", "nodeB", "nodeC") if (tmp_path / f"{n}.log").exists())
        assert codes == [0, 0], logs

    # the micro-batches that count: for each step, those of the last attempt that ran it
    recs = _id_records(ids)
    starts = sorted({r[0] for r in recs})
    assert starts == [0, 4, 11], starts  # fresh; resumed at 4 (world 2); at 11 (world 4 again)
    kept = [r for r in recs if r[0] == max(s for s in starts if s < r[1])]
    by_step = defaultdict(list)
    for _start, step, _epoch, world, accum, idx in kept:
        by_step[step].append((world, accum, len(idx)))
    assert sorted(by_step) == list(range(1, TOTAL + 1))
    for step, mbs in by_step.items():  # 16 images per optimizer step at every world size
        world, accum = (4, 1) if step <= 4 or step > 11 else (2, 2)
        assert mbs == [(world, accum, 4)] * 4, (step, mbs)
    for epoch in (0, 1, 2):  # epoch 0: 4 -> 2 ranks at step 4; epoch 1: 2 -> 4 at step 11 (mid-epoch)
        used = [i for r in kept if r[2] == epoch for i in r[5]]
        assert len(used) == len(set(used)) == 128, (epoch, len(used), len(set(used)))

    # steps and lr schedule continue: every step logged of 24, lr of the one schedule
    from trainer.optim import lr_factor

    text = (output / "train.log").read_text()
    lrs = {int(s): float(lr) for s, lr in re.findall(r"step (\d+)/24 epoch \d+ loss \S+ lr ([0-9.]+)", text)}
    assert sorted(lrs) == list(range(1, TOTAL + 1)) and {t for _, t, _ in step_lines(text)} == {TOTAL}
    for s, lr in lrs.items():
        assert lr == pytest.approx(0.05 * lr_factor(s - 1, TOTAL, "poly", 0, 2.0), abs=6e-6), s
    # checkpoints at each world size hold every classifier row (16 classes)
    metas = checkpoint_meta(output)
    assert metas[10]["world_size"] == metas[11]["world_size"] == 2  # 11: the save on SIGTERM
    assert metas[12]["world_size"] == metas[TOTAL]["world_size"] == 4
    for meta in metas.values():
        ranges = meta["class_ranges"]
        assert ranges[0][0] == 0 and ranges[-1][1] == 16 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    # the rows each rank holds after a resume are the checkpoint's, all of them, re-sliced
    import torch

    for start, world in ((4, 2), (11, 4)):
        saved = sorted((torch.load(f, weights_only=True) for f in (output / "checkpoints" / f"step_{start:08d}")
                        .glob("shard_*.pt")), key=lambda sh: sh["class_range"][0]) if start in metas else None
        loaded = sorted((torch.load(ids / f"head-{start}-{r}.pt", weights_only=True) for r in range(world)),
                        key=lambda h: h["class_range"][0])
        got = torch.cat([h["weight"] for h in loaded])
        assert got.shape[0] == 16 and [h["class_range"] for h in loaded][-1][1] == 16
        if saved is not None:
            assert torch.equal(got, torch.cat([sh["head"]["weight"] for sh in saved]).to(got.dtype))
    assert "continues at 2 ranks x batch 4 after 4 batches at 4 ranks" in text
    assert "optim.grad_accum=2 (configured 1) keeps the global batch 16" in text


def test_preempted_node_saves_then_the_rest_goes_on(tmp_path, tiny_dataset):
    """SIGTERM to node B's launcher at step 5 (a preemption, not a kill): every rank saves at step
    6 (not a checkpoint step: save_every 4), B exits 143, A's agent restarts its workers alone
    and they continue from step 6 at world size 2 with grad_accum 2, each image once per epoch."""
    total = 16
    output = tmp_path / "run"
    cfg = tiny_config(tmp_path / "cfg.yaml", tiny_dataset, output, max_steps=total, save_every=4)
    ids, fault = tmp_path / "ids", tmp_path / "fault"
    ids.mkdir()
    fault.mkdir()
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNPG_IDS_DIR": str(ids), "UNPG_FAULT_DIR": str(fault)}
    procs = [_node(tmp_path, "nodeA", port, cfg, "yes", env)]
    procs.append(_node(tmp_path, "nodeB", port, cfg, "no", {**env, "UNPG_NODE_PAUSE_STEP": "5"}))
    with reaped(procs):
        try:
            _wait_for(fault / "node-paused", procs, "node B reaching the pause step")
            os.kill(procs[1][0].pid, signal.SIGTERM)  # the scheduler preempts node B
            codes = [procs[0][0].wait(timeout=240), procs[1][0].wait(timeout=240)]
        finally:
            logs = "\n".join(f"--- {n}\n" + (tmp_path / f"{n}.log").read_text()[-3000:] for n in ("nodeA", "nodeB"))
        assert codes == [0, 143], logs
    text = (output / "train.log").read_text()
    assert "resumed from" in text and "(step 6, epoch 0, batch 6, world size 4 -> 2)" in text, text[-3000:]
    assert "epoch 0 continues at 2 ranks x batch 4 after 6 batches at 4 ranks x batch 4" in text, text[-3000:]
    metas = checkpoint_meta(output)
    assert metas[4]["world_size"] == metas[6]["world_size"] == 4 and metas[total]["world_size"] == 2
    recs = _id_records(ids)
    assert sorted({r[0] for r in recs}) == [0, 6]  # no step redone: the save was at the step reached
    assert sorted({r[1] for r in recs}) == list(range(1, total + 1))
    assert {(r[3], r[4]) for r in recs if r[1] > 6} == {(2, 2)}
    for epoch in (0, 1):
        used = [i for r in recs if r[2] == epoch for i in r[5]]
        assert len(used) == len(set(used)) == 128, (epoch, len(used), len(set(used)))
