"""trainer.elastic: resuming mid-epoch at another world size / per-rank batch; the data-order keys."""
import pytest
import torch

from trainer import elastic
from trainer.config import config_diff, load_config, to_dict
from trainer.data.plan import Segment


def _state(world, batch_size, batch, segments=(), epoch=3):
    return {"world_size": world, "batch_size": batch_size, "batch": batch, "epoch": epoch,
            "segments": [list(s) for s in segments]}


def test_continue_epoch_closes_the_saved_segment_only_on_a_change():
    assert elastic.continue_epoch(_state(4, 8, 5), 4, 8) == (5, ())          # same size: continue
    assert elastic.continue_epoch(_state(4, 8, 0), 2, 8) == (0, ())          # epoch boundary: nothing used
    assert elastic.continue_epoch(_state(4, 8, 5), 2, 8) == (0, (Segment(4, 8, 5),))
    assert elastic.continue_epoch(_state(4, 8, 5), 4, 4) == (0, (Segment(4, 8, 5),))
    two = elastic.continue_epoch(_state(2, 8, 3, [(4, 8, 5)]), 3, 8)
    assert two == (0, (Segment(4, 8, 5), Segment(2, 8, 3)))
    # a checkpoint before the key: the saved configuration's batch size
    old = {"world_size": 2, "batch": 3, "epoch": 0, "config": {"data": {"batch_size": 6}}}
    assert elastic.continue_epoch(old, 1, 12) == (0, (Segment(2, 6, 3),))


@pytest.mark.parametrize("key,value", [("run.seed", 1), ("data.shuffle_mode", "global"),
                                       ("data.block_bytes", 1 << 20), ("data.shuffle_buffer", 64)])
def test_data_order_keys_are_fixed_for_a_run(key, value):
    a = to_dict(load_config(None, []))
    b = to_dict(load_config(None, [f"{key}={value}"]))
    assert [k for k, _, _ in config_diff(a, b)] == [key]
    c = to_dict(load_config(None, ["data.batch_size=7", "data.num_threads=1"]))
    assert config_diff(a, c) == []  # per-rank batch and loader threads may change


def test_derive_grad_accum_keeps_the_global_batch_or_names_the_sizes():
    assert elastic.derive_grad_accum(8, 2, ref_world=4, ref_accum=1) == 2
    assert elastic.derive_grad_accum(8, 4, ref_world=4, ref_accum=1) == 1
    assert elastic.derive_grad_accum(8, 1, ref_world=2, ref_accum=3) == 6
    with pytest.raises(elastic.GlobalBatchError, match=r"global batch 32 cannot be kept at 3 ranks x "
                                                       r"data.batch_size=8: 4 micro-batches"):
        elastic.derive_grad_accum(8, 3, ref_world=4, ref_accum=1)


def test_global_batch_error_is_a_config_error_exit_2():
    from trainer.errors import EXIT_CONFIG, exit_code

    assert exit_code(elastic.GlobalBatchError("x")) == EXIT_CONFIG


def test_four_ranks_resumed_at_two_keep_the_global_batch_loss_and_lr(tmp_path):
    """One epoch (256 images, global batch 4 x 4 = 16: 16 steps, warm-up and polynomial decay)
    at 4 ranks; the same run interrupted at step 6 (mid-epoch) and resumed at 2 ranks derives
    grad_accum 2: the same images per step, the same loss (no BN, no UNPG: a micro-batch mean of
    means is the global mean) and lr at every step, the same step count, and the epoch's
    images once each."""
    from tests.distributed import run_world
    from tests.trainer.workers import phases_worker

    data = dict(identities=32, per_id=8, val_identities=16, val_pairs=100, seed=0)
    common = ["model.width=8", "model.norm=none", "run.num_epochs=1", "checkpoint.save_every=6",
              "checkpoint.keep_last=5", "data.batch_size=4", "optim.warmup_steps=3", "optim.clip_grad_norm=0"]
    kw = {"record": True}
    full = run_world(phases_worker, 4, str(tmp_path), [{"out": "a", "overrides": common, "kw": kw}], data)
    half = run_world(phases_worker, 2, str(tmp_path), [
        {"out": "b", "overrides": common, "kw": kw, "copy": "a/checkpoints/step_00000006"}], data)
    a, b = full[0][0], half[0][0]
    assert a["accum"] == 1 and b["accum"] == 2 and a["total_steps"] == b["total_steps"] == 16
    assert b["start_step"] == 6 and [h["step"] for h in b["history"]] == list(range(1, 17))
    la = [h["loss"] for h in a["history"]]
    lb = [h["loss"] for h in b["history"] if h["step"] > 6]
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la[6:]), rtol=2e-4, atol=2e-5)
    assert b["lr"] == pytest.approx(a["lr"][6:], rel=1e-12)
    # the epoch's images: steps 1-6 at 4 ranks, 7-16 at 2 ranks, each label multiset as uninterrupted
    first = [torch.cat(r[0]["served"][:6]) for r in full]
    rest = [torch.cat(r[0]["served"]) for r in half]
    whole = [torch.cat(r[0]["served"]) for r in full]
    assert sorted(torch.cat(first + rest).tolist()) == sorted(torch.cat(whole).tolist())


def test_world_size_larger_than_the_class_count_is_a_clear_error():
    from trainer.errors import EXIT_CONFIG, exit_code

    elastic.check_world_size(3, 3, "d")
    with pytest.raises(elastic.ConfigError, match="d: 3 classes cannot be split over 4 ranks") as e:
        elastic.check_world_size(3, 4, "d")
    assert exit_code(e.value) == EXIT_CONFIG
