"""The trainer's expected errors: one line on stderr and the documented exit code, the
traceback in <output>/logs (or on stderr with --debug); every wait on a node lock ends."""
import os
import shutil
import signal
import subprocess
import sys
import time

from tests.launch.e2e import ROOT, tiny_config, tiny_dataset  # noqa: F401  (session fixture)

_HOLDER = """
import sys, time
from pathlib import Path
from trainer.data.face_rec import FaceRecDataset
from trainer.data.node_cache import ScanLock
ds = FaceRecDataset(sys.argv[1])
lock = ScanLock(ds.cache_dir / "labels.lock", "holder").__enter__()
Path(sys.argv[2]).write_text("held")
time.sleep(600)
"""


def _env(tmp_path):
    return {**os.environ, "OMP_NUM_THREADS": "1", "UNPG_DATA_CACHE": str(tmp_path / "cache"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _train(tmp_path, cfg, *extra, timeout=300):
    return subprocess.run([sys.executable, "-m", "trainer.train", str(cfg), *extra], cwd=ROOT, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=timeout)


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_a_stopped_scan_lock_holder_fails_the_run_within_the_timeout(tmp_path, tiny_dataset):  # noqa: F811
    """A process holding the node's labels.lock is stopped (SIGSTOP): the trainer waits
    data.lock_timeout seconds, then exits 5 with one line naming the lock file and the holder
    (before: it printed "waiting for the label scan" forever)."""
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path / "cfg.yaml", tiny_dataset, out, max_steps=2)
    marker = tmp_path / "held"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tiny_dataset), str(marker)], cwd=ROOT,
                              env=_env(tmp_path))
    try:
        t0 = time.monotonic()
        while not marker.exists():
            assert holder.poll() is None and time.monotonic() - t0 < 120, "the holder did not take the lock"
            time.sleep(0.05)
        os.kill(holder.pid, signal.SIGSTOP)
        r = _train(tmp_path, cfg, "data.lock_timeout=2", timeout=240)  # the old code never returns
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 5, r.stderr[-3000:]
    (line,) = _error_lines(r.stderr)
    assert "labels.lock" in line and f"pid {holder.pid} on " in line and "stopped (SIGSTOP" in line, line
    assert f"kill {holder.pid}" in line and "gave up after 2 s" in line
    assert "Traceback" not in r.stderr
    assert "ScanLockTimeout" in (out / "logs" / "error-rank0.log").read_text()


def test_expected_errors_are_one_line_with_their_code_and_the_traceback_in_the_log(tmp_path, tiny_dataset):  # noqa: F811
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    (data / "train.idx").unlink()
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path / "cfg.yaml", data, out, max_steps=2)
    r = _train(tmp_path, cfg)
    assert r.returncode == 5, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    (line,) = _error_lines(r.stderr)
    assert "train.idx" in line and "--write-index" in line and str(out / "logs") in line
    assert "Traceback" in (out / "logs" / "error-rank0.log").read_text()
    # --debug: the traceback on stderr too
    r = _train(tmp_path, cfg, "--debug")
    assert r.returncode == 5 and "Traceback" in r.stderr and _error_lines(r.stderr)
    # a config error: one line, exit 2
    r = _train(tmp_path, cfg, "optim.lr=-1")
    assert r.returncode == 2 and _error_lines(r.stderr) == [
        "error: config key 'optim.lr' must be > 0, got -1.0"], r.stderr


class _Cyclic:
    """Stands for the trainer of a failed run: in a reference cycle (as DDP's hooks make
    it), so only the cycle collector frees it; records whether the group was still there."""

    seen: list = []

    def __init__(self):
        self.me = self

    def __del__(self):
        import torch.distributed as dist
        _Cyclic.seen.append(dist.is_initialized())


def test_a_failed_run_frees_what_holds_the_process_group_before_destroying_it(tmp_path, monkeypatch):
    """A run that fails after its engine is built: main() must free the objects in cycles
    that hold the process group while the group exists. Left to interpreter exit, a gloo
    group torn down after its peers have gone aborted a rank (SIGABRT, 1 run in 6 of
    test_no_loadable_checkpoint_stops_every_rank_naming_each; exit 134 instead of 4)."""
    import gc

    import torch.distributed as dist

    import trainer.train as tt
    from trainer.checkpointer import ResumeError
    from trainer.errors import EXIT_RUN_FOLDER

    def run(cfg):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
        _Cyclic()
        raise ResumeError("no checkpoint could be loaded")

    monkeypatch.setattr(tt, "run", run)
    _Cyclic.seen = []
    gc.disable()  # the collector must not run by chance in between
    try:
        code = tt._main([str(ROOT / "configs/synth_demo.yaml"), f"run.output={tmp_path / 'run'}"])
    finally:
        gc.enable()
        gc.collect()
    assert code == EXIT_RUN_FOLDER
    assert _Cyclic.seen[:1] == [True], _Cyclic.seen  # freed while the group was alive
