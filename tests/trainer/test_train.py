"""End-to-end training on gloo ranks with the tiny backbone and an in-memory synthetic set."""
import shutil

import pytest
import torch

from tests.distributed import run_world
from tests.trainer.synthetic import make_dataset
from tests.trainer.workers import error_worker, train_worker

DATA = dict(identities=32, per_id=8, val_identities=16, val_pairs=100, seed=0)
NO_BN = "model.backbone_kwargs={width: 8, norm: none}"


def test_two_rank_training_lowers_loss_and_raises_accuracy(tmp_path):
    make_dataset(**DATA, bin_path=tmp_path / "val.bin")
    res = run_world(train_worker, 2, str(tmp_path / "run"),
                    ["data.batch_size=16", "max_steps=30", "loss.unpg=true"], DATA, True)
    losses = [h["loss"] for h in res[0]["history"]]
    assert len(losses) == 30
    assert [h["loss"] for h in res[1]["history"]] == losses  # one global loss on every rank
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    before, after = res[0]["val"][0]["acc"]["val"], res[0]["val"][-1]["acc"]["val"]
    assert res[0]["val"][0]["step"] == 0 and res[0]["val"][-1]["step"] == 30
    assert after >= before + 0.08, (before, after)
    run = tmp_path / "run"
    assert (run / "model.pt").is_file() and (run / "config.yaml").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    sd = torch.load(run / "model.pt", weights_only=True)
    assert "fc.weight" in sd and not any(k.startswith("module.") for k in sd)


def _assert_same_weights(a, b):
    for k, v in b["backbone"].items():
        torch.testing.assert_close(a["backbone"][k], v, rtol=1e-4, atol=2e-5, msg=k)
    torch.testing.assert_close(a["head"], b["head"], rtol=1e-4, atol=2e-5)


def test_ddp_matches_single_process_and_accumulation(tmp_path):
    """2 ranks x B == 1 rank x 2B (UNPG over the global batch); 1 rank x B with 2
    accumulation steps == 1 rank x 2B (plain margin loss: UNPG pairs never span
    micro-batches, so accumulation is only equivalent without it)."""
    common = [NO_BN, "max_steps=3", "optim.clip_grad_norm=0", "optim.weight_decay=0.001"]
    args = (DATA, False, None, True, 5)
    two = run_world(train_worker, 2, str(tmp_path / "a"), common + ["data.batch_size=8", "loss.unpg=true"], *args)
    one = run_world(train_worker, 1, str(tmp_path / "b"), common + ["data.batch_size=16", "loss.unpg=true"], *args)[0]
    two = {"backbone": two[0]["backbone"], "head": torch.cat([two[0]["head"], two[1]["head"]])}
    _assert_same_weights(two, one)
    plain = run_world(train_worker, 1, str(tmp_path / "c"), common + ["data.batch_size=16"], *args)[0]
    acc = run_world(train_worker, 1, str(tmp_path / "d"), common + ["data.batch_size=8", "optim.grad_accum=2"],
                    *args)[0]
    _assert_same_weights(acc, plain)
    # the weights did move (the comparison is not vacuous)
    assert (one["init_backbone"]["fc.weight"] - one["backbone"]["fc.weight"]).abs().max() > 1e-3
    assert (one["init_head"] - one["head"]).abs().max() > 1e-3


def _losses(res):
    return [h["loss"] for h in res[0]["history"]]


def _close_losses(got, want):
    """First resumed step: same math up to float summation order; later steps drift
    slightly (different reduction order amplified by lr)."""
    assert abs(got[0] - want[0]) <= 1e-5 * abs(want[0]), (got, want)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-3, atol=1e-3)


def test_resume_same_and_different_world_size(tmp_path):
    common = [NO_BN, "max_steps=12", "save_every=4", "keep_last=5", "loss.unpg=true"]
    a = run_world(train_worker, 2, str(tmp_path / "a"), common + ["data.batch_size=12"], DATA)
    full = _losses(a)
    assert len(full) == 12
    ck = tmp_path / "a" / "checkpoints"
    # same world size, interrupted after step 8: continue bit for bit
    shutil.copytree(ck / "step_00000008", tmp_path / "b" / "checkpoints" / "step_00000008")
    b = run_world(train_worker, 2, str(tmp_path / "b"), common + ["data.batch_size=12"], DATA)
    assert b[0]["start_step"] == 8
    assert _losses(b) == full[8:]
    # 2 -> 3 ranks from step 4 (same global batch 24): re-sharded centres and momentum
    shutil.copytree(ck / "step_00000004", tmp_path / "c" / "checkpoints" / "step_00000004")
    c = run_world(train_worker, 3, str(tmp_path / "c"), common + ["data.batch_size=8"], DATA)
    assert c[0]["start_step"] == 4 and [r["class_range"] for r in c] == [(0, 11), (11, 22), (22, 32)]
    _close_losses(_losses(c), full[4:])
    # 3 -> 1 rank from the 3-rank run's step 8
    shutil.copytree(tmp_path / "c" / "checkpoints" / "step_00000008", tmp_path / "d" / "checkpoints" / "step_00000008")
    d = run_world(train_worker, 1, str(tmp_path / "d"), common + ["data.batch_size=24"], DATA)
    assert d[0]["start_step"] == 8
    _close_losses(_losses(d), _losses(c)[4:])


def test_corrupted_newest_checkpoint_falls_back(tmp_path):
    common = ["max_steps=6", "save_every=2", "keep_last=5", "data.batch_size=16"]
    run_world(train_worker, 2, str(tmp_path / "a"), common, DATA)
    ck = tmp_path / "a" / "checkpoints"
    shutil.rmtree(ck / "step_00000006")
    (ck / "step_00000004" / "shard_00001.pt").write_bytes(b"\x00garbage")  # only rank 1's file is bad
    res = run_world(train_worker, 2, str(tmp_path / "a"), common, DATA)
    assert res[0]["start_step"] == 2 and res[1]["start_step"] == 2
    log = (tmp_path / "a" / "train.log").read_text()
    assert "step_00000004 is unreadable" in log and "falling back" in log


def test_nan_loss_stops_naming_the_step(tmp_path):
    res = run_world(error_worker, 2, str(tmp_path / "a"), ["max_steps=6", "data.batch_size=16"], DATA, 3)
    for kind, msg in res:
        assert kind == "NonFiniteLossError" and "at step 3" in msg, msg
    assert not (tmp_path / "a" / "model.pt").exists()


def test_nan_loss_skip_policy(tmp_path):
    res = run_world(train_worker, 2, str(tmp_path / "a"), ["max_steps=5", "data.batch_size=16",
                                                           "nan_policy=skip"], DATA, False, 3)
    losses = _losses(res)
    assert len(losses) == 5 and all(l == l for l in losses)  # no NaN recorded, 5 real steps
