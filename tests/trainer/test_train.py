"""End-to-end training on gloo ranks with the tiny backbone and an in-memory synthetic set."""

import torch

from tests.distributed import run_world
from tests.trainer.synthetic import make_dataset
from tests.trainer.workers import phases_worker, train_worker

DATA = dict(identities=32, per_id=8, val_identities=16, val_pairs=100, seed=0)
NO_BN = ["model.width=8", "model.norm=none"]


def test_two_rank_training_lowers_loss_and_raises_accuracy(tmp_path):
    make_dataset(**DATA, bin_path=tmp_path / "val.bin")
    res = run_world(train_worker, 2, str(tmp_path / "run"),
                    ["data.batch_size=16", "run.max_steps=30", "loss.unpg=true"], DATA, True)
    losses = [h["loss"] for h in res[0]["history"]]
    assert len(losses) == 30
    assert [h["loss"] for h in res[1]["history"]] == losses  # one global loss on every rank
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    before, after = res[0]["val"][0]["acc"]["val"], res[0]["val"][-1]["acc"]["val"]
    assert res[0]["val"][0]["step"] == 0 and res[0]["val"][-1]["step"] == 30
    assert after >= before + 0.08, (before, after)
    run = tmp_path / "run"
    assert (run / "model.pt").is_file() and (run / "config.yaml").is_file() and (run / "model_best.pt").is_file()
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
    common = [*NO_BN, "run.max_steps=3", "optim.clip_grad_norm=0", "optim.weight_decay=0.001"]
    kw = {"return_weights": True, "head_init_seed": 5}
    two = run_world(phases_worker, 2, str(tmp_path), [
        {"out": "a", "overrides": common + ["data.batch_size=8", "loss.unpg=true"], "kw": kw}], DATA)
    one, plain, acc = run_world(phases_worker, 1, str(tmp_path), [
        {"out": "b", "overrides": common + ["data.batch_size=16", "loss.unpg=true"], "kw": kw},
        {"out": "c", "overrides": common + ["data.batch_size=16"], "kw": kw},
        {"out": "d", "overrides": common + ["data.batch_size=8", "optim.grad_accum=2"], "kw": kw}], DATA)[0]
    two = {"backbone": two[0][0]["backbone"], "head": torch.cat([two[0][0]["head"], two[1][0]["head"]])}
    _assert_same_weights(two, one)
    _assert_same_weights(acc, plain)
    # the weights did move (the comparison is not vacuous)
    assert (one["init_backbone"]["fc.weight"] - one["backbone"]["fc.weight"]).abs().max() > 1e-3
    assert (one["init_head"] - one["head"]).abs().max() > 1e-3


def _losses(res):
    return [h["loss"] for h in res["history"] if h["step"] > res.get("start_step", 0)]


def _close_losses(got, want):
    """First resumed step: same math up to float summation order; later steps drift
    slightly (different reduction order amplified by lr)."""
    assert abs(got[0] - want[0]) <= 1e-5 * abs(want[0]), (got, want)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-3, atol=1e-3)


def test_resume_same_and_different_world_size(tmp_path):
    common = [*NO_BN, "run.max_steps=12", "checkpoint.save_every=4", "checkpoint.keep_last=5", "loss.unpg=true"]
    # uninterrupted 2-rank run; then a run "interrupted" after step 8 resumes: bit for bit
    a, b = run_world(phases_worker, 2, str(tmp_path), [
        {"out": "a", "overrides": common + ["data.batch_size=12"]},
        {"out": "b", "overrides": common + ["data.batch_size=12"], "copy": "a/checkpoints/step_00000008"},
    ], DATA)[0]
    full = _losses(a)
    assert len(full) == 12 and b["start_step"] == 8
    assert _losses(b) == full[8:]
    # 2 -> 3 ranks from step 4 (same global batch 24): re-sharded centres and momentum
    c = run_world(phases_worker, 3, str(tmp_path), [
        {"out": "c", "overrides": common + ["data.batch_size=8"], "copy": "a/checkpoints/step_00000004"}], DATA)
    assert [r[0]["class_range"] for r in c] == [(0, 11), (11, 22), (22, 32)]
    c = c[0][0]
    assert c["start_step"] == 4
    _close_losses(_losses(c), full[4:])
    # 3 -> 1 rank from the 3-rank run's step 8
    d = run_world(phases_worker, 1, str(tmp_path), [
        {"out": "d", "overrides": common + ["data.batch_size=24"], "copy": "c/checkpoints/step_00000008"}], DATA)[0][0]
    assert d["start_step"] == 8
    _close_losses(_losses(d), _losses(c)[4:])


def test_corrupted_newest_checkpoint_falls_back(tmp_path):
    """(Also runs the bf16 autocast path of the DDP engine on CPU.)"""
    common = [
        "run.max_steps=6",
        "checkpoint.save_every=2",
        "checkpoint.keep_last=5",
        "data.batch_size=16",
        "engine.precision=bf16",
    ]
    ck = "a/checkpoints/"
    _, res = run_world(phases_worker, 2, str(tmp_path), [
        {"out": "a", "overrides": common},
        # newest complete = step 4 after removing 6; only rank 1's file of it is bad
        {"out": "a", "overrides": common, "remove": [ck + "step_00000006"],
         "corrupt": [ck + "step_00000004/shard_00001.pt"]},
    ], DATA)[0]
    assert res["start_step"] == 2
    log = (tmp_path / "a" / "train.log").read_text()
    assert "step_00000004 is unreadable" in log and "falling back" in log


def test_nan_loss_stops_naming_the_step_or_skips(tmp_path):
    res = run_world(phases_worker, 2, str(tmp_path), [
        {"out": "stop", "overrides": ["run.max_steps=6", "data.batch_size=16"], "kw": {"nan_at_batch": 3},
         "expect_error": True},
        {"out": "skip", "overrides": ["run.max_steps=5", "data.batch_size=16", "run.nan_policy=skip"],
         "kw": {"nan_at_batch": 3, "return_weights": True}},
    ], DATA)
    for rank_res in res:
        kind, msg = rank_res[0]
        assert kind == "NonFiniteLossError" and "at step 3" in msg, msg
    assert not (tmp_path / "stop" / "model.pt").exists()
    hist = res[0][1]["history"]
    # the NaN batch's step was skipped on the device: recorded as such, no weight changed by it
    assert [h["step"] for h in hist] == [1, 2, 3, 4, 5] and [h.get("skipped", False) for h in hist] == [
        False, False, True, False, False]
    assert all(h["loss"] == h["loss"] for h in hist if not h.get("skipped"))
    assert all(torch.isfinite(v).all() for v in res[0][1]["backbone"].values() if v.is_floating_point())
    assert torch.isfinite(res[0][1]["head"]).all()


def test_no_loadable_checkpoint_stops_every_rank_naming_each(tmp_path):
    """Both checkpoints unreadable for rank 1 only: every rank stops (no fresh start on top of
    the old run) and the message lists each candidate with rank 1's reason."""
    common = ["run.max_steps=4", "checkpoint.save_every=2", "checkpoint.keep_last=5", "data.batch_size=16"]
    ck = "a/checkpoints/"
    res = run_world(phases_worker, 2, str(tmp_path), [
        {"out": "a", "overrides": common},
        {"out": "a", "overrides": common, "expect_error": True,
         "corrupt": [ck + "step_00000004/shard_00001.pt", ck + "step_00000002/shard_00001.pt"]},
    ], DATA)
    for rank_res in res:
        kind, msg = rank_res[1]
        assert kind == "ResumeError", msg
        assert "step_00000004: rank 1:" in msg and "step_00000002: rank 1:" in msg, msg
    for step in (2, 4):  # nothing pruned, overwritten or moved
        assert (tmp_path / ck / f"step_{step:08d}" / "COMPLETE").is_file()
    assert (tmp_path / "a" / "model.pt").is_file()
