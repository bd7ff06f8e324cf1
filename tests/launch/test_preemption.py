"""Real torchrun runs (2 ranks, gloo): one owner per run folder, preemption by SIGTERM with a
checkpoint at the current step and a resume from it, and no worker outliving its agent."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch.e2e import ROOT, checkpoint_meta, reaped, resumed_steps, step_lines, tiny_config

LONG = 100_000  # steps: the run is stopped from outside long before


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _launch(cfg: Path, log_path: Path, *extra: str):
    log = open(log_path, "w")
    cmd = [sys.executable, "-m", "launch", "single", "--nproc-per-node", "2", "--", str(cfg), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT), log


def _wait_for_steps(output: Path, n: int, proc, where: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while True:
        log = output / "train.log"
        if log.is_file() and len(step_lines(log.read_text())) >= n:
            return
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"the run did not reach step {n}:\n" + where.read_text()[-4000:])
        time.sleep(0.2)


def _children(pid: int):
    """Direct children of ``pid`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_second_job_refused_then_sigterm_saves_at_the_current_step_and_resumes(tmp_path, tiny_dataset):
    output = tmp_path / "run"
    cfg = tiny_config(tmp_path / "cfg.yaml", tiny_dataset, output, max_steps=LONG, save_every=1000)
    proc, log = _launch(cfg, tmp_path / "a.log")
    with reaped([(proc, log)]):
        _wait_for_steps(output, 3, proc, tmp_path / "a.log")
        # a second job on the same folder is refused while the first keeps running
        second = subprocess.run([sys.executable, "-m", "trainer.train", str(cfg)], cwd=ROOT, env=_env(),
                                capture_output=True, text=True, timeout=240)
        assert second.returncode == 4, second.stderr[-3000:]
        assert str(output) in second.stderr and "in use by another job" in second.stderr and "pid " in second.stderr
        assert proc.poll() is None, "the first job stopped"
        n_before = len(step_lines((output / "train.log").read_text()))
        _wait_for_steps(output, n_before + 2, proc, tmp_path / "a.log")  # ... and still trains
        # preemption: SIGTERM to torchrun (what SLURM / Kubernetes send)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=240)
    agent = (tmp_path / "a.log").read_text()
    assert rc == 128 + signal.SIGTERM, agent[-3000:]  # the workers' code, not torchrun's 1
    text = (output / "train.log").read_text()
    steps = [s for s, _, _ in step_lines(text)]
    assert "received SIGTERM" in text, agent[-3000:]
    metas = checkpoint_meta(output)
    assert metas, agent[-3000:]
    saved = max(metas)
    assert saved == steps[-1] and saved > n_before, (saved, steps[-5:])  # at the step reached, not earlier
    assert metas[saved]["world_size"] == 2 and f"exit code {128 + signal.SIGTERM}" in text
    assert not (output / "model.pt").exists()
    # resume: continue from that very step
    proc, log = _launch(cfg, tmp_path / "b.log", f"run.max_steps={saved + 3}")
    with reaped([(proc, log)]):
        assert proc.wait(timeout=240) == 0, (tmp_path / "b.log").read_text()[-4000:]
    text = (output / "train.log").read_text()
    assert resumed_steps(text) == [saved]
    assert [s for s, _, _ in step_lines(text)][len(steps):] == [saved + 1, saved + 2, saved + 3]
    assert (output / "model.pt").is_file()


def test_workers_die_with_their_agent(tmp_path, tiny_dataset):
    output = tmp_path / "run"
    cfg = tiny_config(tmp_path / "cfg.yaml", tiny_dataset, output, max_steps=LONG, save_every=1000)
    proc, log = _launch(cfg, tmp_path / "a.log")
    workers = []
    try:
        with reaped([(proc, log)]):
            _wait_for_steps(output, 2, proc, tmp_path / "a.log")
            (torchrun,) = _children(proc.pid)  # python -m launch -> torchrun -> 2 workers
            workers = _children(torchrun) + [torchrun]
            assert len(workers) == 3, (workers, [Path(f"/proc/{w}/cmdline").read_text() for w in workers])
            proc.kill()  # kill -9 of the launcher only
            proc.wait(timeout=60)
        deadline = time.time() + 60
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "workers outlived their agent"
        # the folder's lock went with them: a new job gets it
        from trainer.runtime.run_lock import RunLock

        RunLock(output).acquire(wait_s=10).release()
    finally:
        for w in workers:  # the old code's orphans
            if _alive(w):
                os.kill(w, signal.SIGKILL)


def _signals_after_two_steps(tmp_path, tiny_dataset, *signals, gap=0.3):
    """Launch a long run (python -m launch), send ``signals`` to the launcher ``gap`` s apart
    once two steps are logged; (launcher's exit code, run folder). Its log: tmp_path/a.log."""
    output = tmp_path / "run"
    cfg = tiny_config(tmp_path / "cfg.yaml", tiny_dataset, output, max_steps=LONG, save_every=1000)
    proc, log = _launch(cfg, tmp_path / "a.log")
    with reaped([(proc, log)]):
        _wait_for_steps(output, 2, proc, tmp_path / "a.log")
        for i, sig in enumerate(signals):
            if i:
                time.sleep(gap)
            proc.send_signal(sig)
        rc = proc.wait(timeout=240)
    return rc, output


def test_sigusr1_through_python_m_launch(tmp_path, tiny_dataset):
    """SLURM's --signal=B:USR1 path: torchrun (as exec'd by python -m launch) must handle SIGUSR1
    and forward it (its default signal list lacks it: it would die and orphan its workers)."""
    rc, output = _signals_after_two_steps(tmp_path, tiny_dataset, signal.SIGUSR1)
    assert rc == 128 + signal.SIGUSR1, (tmp_path / "a.log").read_text()[-3000:]
    text = (output / "train.log").read_text()
    steps = [s for s, _, _ in step_lines(text)]
    metas = checkpoint_meta(output)
    assert "received SIGUSR1" in text and metas and max(metas) == steps[-1], (tmp_path / "a.log").read_text()[-3000:]
    assert f"exit code {128 + signal.SIGUSR1}" in text


def test_a_second_sigterm_to_the_launcher_does_not_cut_the_save(tmp_path, tiny_dataset):
    """SIGTERM, then SIGTERM again while the workers finish the step and save: the launcher
    does not forward the repeat (torchrun would kill the workers mid-save); the job saves at
    the step reached and exits 143."""
    rc, output = _signals_after_two_steps(tmp_path, tiny_dataset, signal.SIGTERM, signal.SIGTERM)
    agent = (tmp_path / "a.log").read_text()
    assert rc == 128 + signal.SIGTERM, agent[-3000:]
    assert "SIGTERM again: not forwarded" in agent
    steps = [s for s, _, _ in step_lines((output / "train.log").read_text())]
    metas = checkpoint_meta(output)
    assert metas and max(metas) == steps[-1], agent[-3000:]


def test_config_error_reaches_the_scheduler_as_2(tmp_path, tiny_dataset):
    cfg = tiny_config(tmp_path / "cfg.yaml", tiny_dataset, tmp_path / "run")
    proc, log = _launch(cfg, tmp_path / "a.log", "optim.lr=-1")
    with reaped([(proc, log)]):
        rc = proc.wait(timeout=240)
    agent = (tmp_path / "a.log").read_text()
    assert rc == 2, agent[-3000:]
    assert "optim.lr" in agent
