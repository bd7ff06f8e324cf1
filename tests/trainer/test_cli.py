"""The real entry point under torchrun, on a RecordIO set made by data_tools synth."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_torchrun_two_ranks_on_synth_recordio(tmp_path):
    synth = pytest.importorskip("data_tools.synth")
    pytest.importorskip("trainer.data").build_train_loader  # noqa: B018 (lands with the data branch)
    data = tmp_path / "synth"
    synth.generate_dataset(data, identities=24, images_per_identity=6, seed=1, label_noise=0.0,
                           val_identities=10, val_pairs=60, workers=1)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "trainer.train", os.path.join(ROOT, "configs", "synth_demo.yaml"),
           f"run.output={run}", f"data.train_dir={data}", "data.batch_size=16", "run.max_steps=8",
           "checkpoint.save_every=4", "validation.every=0", "logging.log_every=2", "model.embedding_size=32",
           "optim.warmup_steps=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "step 8/8" in r.stdout and "verification step 0 val accuracy" in r.stdout
    s = json.load(open(run / "summary.json"))
    assert s["world_size"] == 2 and s["steps"] == 8 and [v["step"] for v in s["val"]] == [0, 8]
    for f in ("model.pt", "config.yaml", "train.log", "checkpoints/step_00000004/COMPLETE",
              "checkpoints/step_00000008/shard_00001.pt"):
        assert (run / f).exists(), f
    # run again: resume: auto finds step 8 = the end, nothing left to train
    r2 = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0 and "resumed from" in r2.stdout and "step_00000008" in r2.stdout
