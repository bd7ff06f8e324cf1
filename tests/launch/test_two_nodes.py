"""Two "nodes" on one machine: two separate ``python -m launch multi`` invocations (each one
torchrun with one process) meet at a c10d rendezvous on localhost and form one 2-rank gloo
job that trains and writes sharded checkpoints."""
import os
import subprocess
import sys

import torch

from tests.launch.e2e import ROOT, checkpoint_meta, free_port, reaped, step_lines, tiny_config


def _node(tmp_path, name, port, cfg, host):
    out = open(tmp_path / f"{name}.log", "w")
    cmd = [sys.executable, "-m", "launch", "multi", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"two-nodes-{port}",
           "--rdzv-host", host, "--max-restarts", "0", "--", str(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT), out


def test_two_torchruns_form_one_two_rank_job(tmp_path, tiny_dataset):
    output = tmp_path / "run"
    cfg = tiny_config(tmp_path / "cfg.yaml", tiny_dataset, output, max_steps=8, save_every=4)
    port = free_port()
    procs = [_node(tmp_path, "nodeA", port, cfg, "yes"), _node(tmp_path, "nodeB", port, cfg, "no")]
    with reaped(procs):
        codes = [p.wait(timeout=240) for p, _ in procs]
    logs = {n: (tmp_path / f"{n}.log").read_text() for n in ("nodeA", "nodeB")}
    assert codes == [0, 0], f"exit codes {codes}\n" + "\n".join(f"--- {k}\n{v[-3000:]}" for k, v in logs.items())

    # One job of world size 2: every complete checkpoint has both ranks' head shards.
    metas = checkpoint_meta(output)
    assert sorted(metas) == [4, 8]
    for _step, meta in metas.items():
        assert meta["world_size"] == 2
        assert {"shard_00000.pt", "shard_00001.pt", "trainer.pt"} <= set(meta["files"])
        (lo0, hi0), (lo1, hi1) = meta["class_ranges"]
        assert lo0 == 0 and hi0 == lo1 and hi1 == 16  # 16 classes split over the two ranks
    state = torch.load(output / "checkpoints" / "step_00000008" / "trainer.pt", weights_only=False)
    assert state["step"] == 8 and state["world_size"] == 2

    # Rank 0 (on one of the two "nodes") logged every step once, with finite losses.
    steps = step_lines((output / "train.log").read_text())
    assert [s for s, _, _ in steps] == list(range(1, 9))
    assert all(total == 8 for _, total, _ in steps)
    assert all(loss == loss and loss < 1e3 for _, _, loss in steps)
    assert (output / "model.pt").is_file()
    # Both torchrun agents took part in the same rendezvous round.
    for name, text in logs.items():
        assert "torch.distributed.run" in text and "--nnodes=2" in text, name
