"""trainer.elastic: resuming mid-epoch at another world size / per-rank batch; the data-order keys."""
import pytest

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
    with pytest.raises(elastic.GlobalBatchError, match=r"global batch 32 \(data.batch_size=8 x 4 ranks x "
                                                       r"optim.grad_accum=1\) cannot be kept at 3 ranks"):
        elastic.derive_grad_accum(8, 3, ref_world=4, ref_accum=1)
