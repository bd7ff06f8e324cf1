"""A run folder's safety: files that would run code are refused, a resume never silently starts
over or mixes configurations, the history survives resumes, pruning is marker-first, one owner
per folder, and the data's class count agrees with its labels. One process, in-memory data."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.trainer.synthetic import MemoryLoader, make_dataset
from tests.trainer.workers import tiny_config
from trainer import checkpoint as ck
from trainer.checkpointer import ResumeError
from trainer.config import ConfigError
from trainer.loop import Trainer
from trainer.runtime.run_lock import RunLock, RunLockedError

IMGS, LABELS = make_dataset(identities=8, per_id=4, val_identities=2, val_pairs=4, seed=0)
SHORT = ["data.batch_size=8", "run.max_steps=4", "checkpoint.save_every=2", "checkpoint.keep_last=5"]


def _trainer(out, overrides=(), labels=LABELS, num_classes=None):
    cfg = tiny_config(out, SHORT + list(overrides))

    def factory(c, d):
        return MemoryLoader(IMGS, labels, c.data.batch_size, d.rank, d.world_size, c.run.seed,
                            num_classes=num_classes)

    return Trainer(cfg, factory)


def _train(out, overrides=()):
    t = _trainer(out, overrides).setup()
    start = t.step
    res = t.train()
    res["start_step"] = start
    return res


class _Payload:
    """Unpickling this runs code (creates a file) -- what a planted checkpoint would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ------------------------------------------------------------------ files that run code
def test_planted_pickle_is_refused_naming_the_file(tmp_path):
    proof = tmp_path / "PAYLOAD_RAN"
    d = tmp_path / "step_00000002"
    ck.write_shard(d, 0, {"class_range": (0, 4), "head": {"weight": torch.zeros(4, 2)}, "optimizer": {}})
    torch.save({"step": 2, "x": _Payload(proof)}, d / ck.TRAINER_FILE)
    ck.finish_save(d, 2, 1, [(0, 4)], keep_last=3)
    with pytest.raises(ck.UnsafeCheckpointError, match=r"trainer\.pt.*refused"):
        ck.load_for_rank(d, 0, 1, (0, 4))
    assert not proof.exists()
    # a planted shard too
    torch.save({"class_range": (0, 4), "head": _Payload(proof)}, ck.shard_file(d, 0))
    with pytest.raises(ck.UnsafeCheckpointError, match="shard_00000.pt"):
        ck.load_file(ck.shard_file(d, 0))
    assert not proof.exists()


def test_rng_state_is_plain_and_round_trips(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    np.random.standard_normal()  # a cached gaussian in numpy's state
    torch.save(ck.rng_state(), tmp_path / "rng.pt")
    want = (torch.rand(3), np.random.rand(3), random.random(), np.random.standard_normal())
    st = torch.load(tmp_path / "rng.pt", weights_only=True)  # no allow-list needed: plain values only
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    ck.set_rng_state(st)
    got = (torch.rand(3), np.random.rand(3), random.random(), np.random.standard_normal())
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2:] == want[2:]


def test_checkpoint_of_earlier_versions_still_loads(tmp_path):
    """Before this change numpy's RNG state was saved as its tuple (an ndarray inside)."""
    np.random.seed(5)
    old = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    want = np.random.rand(2)
    torch.save({"class_range": (0, 4), "head": {}, "optimizer": {}, "rng": old}, tmp_path / "s.pt")
    st = ck.load_file(tmp_path / "s.pt")["rng"]
    np.random.seed(0)
    ck.set_rng_state(st)
    assert np.array_equal(np.random.rand(2), want)


def test_prune_removes_the_marker_first(tmp_path, monkeypatch):
    """A prune that dies before the files are gone must not leave a 'complete' checkpoint."""
    for step in (1, 2, 3):
        d = ck.checkpoint_dir(tmp_path, step)
        ck.write_shard(d, 0, {"class_range": (0, 2), "head": {}, "optimizer": {}})
        ck.finish_save(d, step, 1, [(0, 2)], keep_last=10)
    monkeypatch.setattr(ck.shutil, "rmtree", lambda *a, **k: None)  # the deletion never happens
    ck.prune(tmp_path, keep_last=1)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [3]


# ------------------------------------------------------------------------------ resume
def test_unloadable_checkpoints_stop_the_run_and_change_nothing(tmp_path):
    out = tmp_path / "run"
    _train(out)
    model = (out / "model.pt").read_bytes()
    config = (out / "config.yaml").read_text()
    c2, c4 = (ck.checkpoint_dir(out / "checkpoints", s) for s in (2, 4))
    (c4 / "trainer.pt").write_bytes((c4 / "trainer.pt").read_bytes()[:100])  # truncated
    torch.save({"x": _Payload(tmp_path / "PAYLOAD_RAN")}, c2 / "trainer.pt")  # planted
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(ResumeError) as e:
        _trainer(out, ["logging.log_every=3"]).setup()
    msg = str(e.value)
    assert "step_00000004" in msg and "step_00000002" in msg and "UnsafeCheckpointError" in msg, msg
    assert not (tmp_path / "PAYLOAD_RAN").exists()
    assert (out / "model.pt").read_bytes() == model and (out / "config.yaml").read_text() == config
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    # resume=none starts over deliberately: the old run is moved aside, not deleted
    _train(out, ["checkpoint.resume=none"])
    prev = [p for p in out.iterdir() if p.name.startswith("previous-")]
    assert len(prev) == 1 and (prev[0] / "model.pt").read_bytes() == model and (prev[0] / "config.yaml").is_file()
    assert sorted(p.name for p in (prev[0] / "checkpoints").iterdir()) == before
    assert ck.list_checkpoints(out / "checkpoints")[-1][0] == 4


def test_finished_run_without_checkpoints_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    _train(out)
    import shutil

    shutil.rmtree(out / "checkpoints")
    with pytest.raises(ResumeError, match="model.pt"):
        _trainer(out).setup()


def test_changed_configuration_stops_with_the_diff(tmp_path):
    out = tmp_path / "run"
    _train(out)
    config = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError) as e:
        _trainer(out, ["loss.m=0.4", "optim.lr=1e-3"]).setup()
    msg = str(e.value)
    assert "loss.m: 0.3 (checkpoint) -> 0.4 (this run)" in msg and "optim.lr" in msg, msg
    assert "allow_config_change" in msg and (out / "config.yaml").read_text() == config
    t = _trainer(out, ["loss.m=0.4", "checkpoint.allow_config_change=true"]).setup()
    assert t.step == 4
    t.close()
    assert "m: 0.4" in (out / "config.yaml").read_text()


def test_summary_history_is_carried_across_resumes(tmp_path):
    out = tmp_path / "run"
    first = _train(out)
    second = _train(out, ["run.max_steps=6"])
    assert second["start_step"] == 4
    summary = json.loads((out / "summary.json").read_text())
    assert [h["step"] for h in summary["history"]] == [1, 2, 3, 4, 5, 6]
    assert [h["loss"] for h in summary["history"][:4]] == [h["loss"] for h in first["history"]]


# -------------------------------------------------------------------------- one owner
def test_second_owner_of_a_run_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from trainer.runtime.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); time.sleep(60)"), str(out)],
        stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError) as e:
            _trainer(out).setup()
        assert str(out) in str(e.value) and f"pid {holder.pid}" in str(e.value)
        assert not (out / "config.yaml").exists() and not (out / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead: the kernel released its lock
    lock = RunLock(out).acquire()
    lock.release()
    _train(out)


# ------------------------------------------------------------------- data vs labels
def test_class_count_must_match_the_labels(tmp_path):
    with pytest.raises(ConfigError, match=r"labels stop at 7.*data.num_classes=12"):
        _trainer(tmp_path / "a", num_classes=12).setup()
    t = _trainer(tmp_path / "b", ["data.num_classes=12"], num_classes=12).setup()  # said so: allowed
    assert t.num_classes == 12
    t.close()
    with pytest.raises(ConfigError, match="at least 2 classes"):
        _trainer(tmp_path / "c", labels=torch.zeros_like(LABELS)).setup()


# ------------------------------------------------------------------------- preemption
def test_signal_stops_the_run_with_a_checkpoint_at_the_current_step(tmp_path):
    import signal

    from trainer.runtime.preemption import Preempted

    out = tmp_path / "run"
    t = _trainer(out, ["run.max_steps=50", "checkpoint.save_every=1000"]).setup()
    one_step = t._one_step

    def step_with_signal():
        if t.step == 3:  # the signal lands while step 4 runs
            os.kill(os.getpid(), signal.SIGUSR1)
        return one_step()

    t._one_step = step_with_signal
    with pytest.raises(Preempted) as e:
        t.train()
    assert (e.value.step, e.value.code) == (4, 128 + signal.SIGUSR1)
    assert [s for s, _ in ck.list_checkpoints(out / "checkpoints")] == [4]
    assert not (out / "model.pt").exists()
    assert [h["step"] for h in json.loads((out / "summary.json").read_text())["history"]] == [1, 2, 3, 4]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored
    t = _trainer(out, ["run.max_steps=6", "checkpoint.save_every=1000"]).setup()
    assert t.step == 4
    t.close()


SECOND_SIGNAL = """
import os, signal, sys, time
from trainer.runtime.preemption import PreemptionHandler
h = PreemptionHandler(["SIGTERM"]).install()
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGTERM)   # the same request delivered twice: ignored
time.sleep(0.1)
print("flag", h.requested, flush=True)
time.sleep(2.2)
h.saving = True                        # a checkpoint is being written
os.kill(os.getpid(), signal.SIGTERM)   # the user insists: out now
time.sleep(5)
print("still running", flush=True)
"""


def test_second_signal_during_the_save_exits_at_once():
    r = subprocess.run([sys.executable, "-c", SECOND_SIGNAL], capture_output=True, text=True, timeout=60,
                       cwd=os.getcwd())
    assert r.returncode == 143 and "flag True" in r.stdout and "still running" not in r.stdout, (r.stdout, r.stderr)
    assert "during the checkpoint save" in r.stderr


def test_deepspeed_files_naming_foreign_code_are_refused(tmp_path):
    pytest.importorskip("deepspeed")
    from trainer.engine.deepspeed import check_deepspeed_files

    ds = tmp_path / "deepspeed" / "ds"
    ds.mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}}, ds / "mp_rank_00_model_states.pt")
    check_deepspeed_files(tmp_path / "deepspeed")  # plain: fine
    torch.save(
        {"optimizer_state_dict": _Payload(tmp_path / "PAYLOAD_RAN")}, ds / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    )
    with pytest.raises(ck.UnsafeCheckpointError, match=r"zero_pp_rank_0.*io.open"):
        check_deepspeed_files(tmp_path / "deepspeed")
    assert not (tmp_path / "PAYLOAD_RAN").exists()


def test_the_same_dataset_folder_spelled_relative_resumes(tmp_path, monkeypatch):
    """data.train_dir given absolute, then relative to the current directory (the same folder):
    not a configuration change (before: refused as one); another folder still is."""
    (tmp_path / "ds").mkdir()
    (tmp_path / "other").mkdir()
    out = tmp_path / "run"
    _train(out, [f"data.train_dir={tmp_path / 'ds'}"])
    monkeypatch.chdir(tmp_path)
    t = _trainer(out, ["data.train_dir=ds", "run.max_steps=6"]).setup()
    assert t.step == 4
    t.close()
    with pytest.raises(ConfigError, match="data.train_dir"):
        _trainer(out, ["data.train_dir=other", "run.max_steps=6"]).setup()
