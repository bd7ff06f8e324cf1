"""Elastic restart: under ``--max-restarts 1`` one rank is killed with SIGKILL mid-run; torchrun
restarts the group, which resumes from the newest complete checkpoint and finishes. No step is
lost or done twice beyond the checkpoint interval, and the redone steps repeat the same losses
(the resumed curve continues the interrupted one)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.launch.e2e import ROOT, checkpoint_meta, reaped, resumed_steps, step_lines, tiny_config

TOTAL, EVERY, KILL_AFTER = 16, 4, 10  # checkpoints at 4, 8, 12; rank 1 dies after step 10


def test_kill_9_one_rank_group_restarts_and_resumes(tmp_path, tiny_dataset):
    output = tmp_path / "run"
    cfg = tiny_config(tmp_path / "cfg.yaml", tiny_dataset, output, max_steps=TOTAL, save_every=EVERY)
    fault = tmp_path / "fault"
    fault.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNPG_FAULT_STEP": str(KILL_AFTER),
           "UNPG_FAULT_RANK": "1", "UNPG_FAULT_DIR": str(fault)}
    cmd = [sys.executable, "-m", "launch", "single", "--nproc-per-node", "2", "--max-restarts", "1",
           "--module", "tests.launch.fault_worker", "--", str(cfg)]
    log = open(tmp_path / "torchrun.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    killed = None
    try:
        deadline = time.time() + 240
        while not (fault / "ready").exists():
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("rank 1 never reached the fault step:\n" + (tmp_path / "torchrun.log").read_text()[-4000:])
            time.sleep(0.1)
        killed = int((fault / "ready").read_text())
        os.kill(killed, signal.SIGKILL)  # kill -9 of one rank mid-run
        code = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    agent_log = (tmp_path / "torchrun.log").read_text()
    assert code == 0, agent_log[-4000:]
    assert "-9" in agent_log or "SIGKILL" in agent_log, "torchrun did not report the killed rank"

    text = (output / "train.log").read_text()
    steps = step_lines(text)
    nums = [s for s, _, _ in steps]
    # first attempt: 1..KILL_AFTER; after the restart: resume at the newest complete
    # checkpoint (8), redo 9..10 and finish at TOTAL.
    last_ckpt = KILL_AFTER // EVERY * EVERY
    assert resumed_steps(text) == [last_ckpt]
    assert nums == list(range(1, KILL_AFTER + 1)) + list(range(last_ckpt + 1, TOTAL + 1)), nums
    redone = KILL_AFTER - last_ckpt
    assert 0 < redone < EVERY  # lost work is bounded by the checkpoint interval

    first = {s: loss for s, _, loss in steps[:KILL_AFTER]}
    second = {s: loss for s, _, loss in steps[KILL_AFTER:]}
    for s in range(last_ckpt + 1, KILL_AFTER + 1):
        assert second[s] == pytest.approx(first[s], rel=1e-5, abs=1e-6), (
            f"step {s}: loss {second[s]} after the restart vs {first[s]} before it")

    metas = checkpoint_meta(output)
    assert max(metas) == TOTAL and metas[TOTAL]["world_size"] == 2
    assert (output / "model.pt").is_file()
    # The killed process is gone; torchrun started a fresh group (restart count 1).
    with pytest.raises(ProcessLookupError):
        os.kill(killed, 0)


@pytest.mark.slow
def test_kill_9_on_one_of_two_nodes_restarts_both(tmp_path, tiny_dataset):
    """The same failure across two torchrun agents (two "nodes", c10d rendezvous): the agent
    of the dead rank restarts its workers, the other agent joins the new rendezvous round,
    and the job resumes and finishes. (Slow: test_kill_9_one_rank_group_restarts_and_resumes
    covers the resume semantics; this adds the cross-agent restart.)"""
    from tests.launch.e2e import free_port

    output = tmp_path / "run"
    cfg = tiny_config(tmp_path / "cfg.yaml", tiny_dataset, output, max_steps=TOTAL, save_every=EVERY)
    fault = tmp_path / "fault"
    fault.mkdir()
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNPG_FAULT_STEP": str(KILL_AFTER),
           "UNPG_FAULT_RANK": "1", "UNPG_FAULT_DIR": str(fault)}
    procs = []
    for name, host in (("nodeA", "yes"), ("nodeB", "no")):
        cmd = [sys.executable, "-m", "launch", "multi", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"restart-{port}",
               "--rdzv-host", host, "--max-restarts", "1", "--module", "tests.launch.fault_worker",
               "--", str(cfg)]
        f = open(tmp_path / f"{name}.log", "w")
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT), f))
    with reaped(procs):
        deadline = time.time() + 300
        while not (fault / "ready").exists():
            if any(p.poll() is not None for p, _ in procs) or time.time() > deadline:
                pytest.fail("rank 1 never reached the fault step")
            time.sleep(0.1)
        os.kill(int((fault / "ready").read_text()), signal.SIGKILL)
        codes = [p.wait(timeout=300) for p, _ in procs]
    logs = "\n".join((tmp_path / f"{n}.log").read_text()[-3000:] for n in ("nodeA", "nodeB"))
    assert codes == [0, 0], logs
    text = (output / "train.log").read_text()
    last_ckpt = KILL_AFTER // EVERY * EVERY
    assert resumed_steps(text) == [last_ckpt]
    assert [s for s, _, _ in step_lines(text)] == list(range(1, KILL_AFTER + 1)) + list(range(last_ckpt + 1, TOTAL + 1))
    metas = checkpoint_meta(output)
    assert max(metas) == TOTAL and metas[TOTAL]["world_size"] == 2
