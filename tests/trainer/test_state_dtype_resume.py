"""``loss.state_dtype: bf16`` through the trainer: checkpoints, re-sharding, conversion, export."""
import torch

from tests.distributed import run_world
from tests.trainer.test_train import DATA, NO_BN, _losses
from tests.trainer.workers import phases_worker
from trainer import checkpoint as ck


def _shard_weights(ckpt):
    meta = ck.read_marker(ckpt)
    return ck.load_shard_for_range(ckpt, (0, meta["class_ranges"][-1][1]), meta["class_ranges"])


def test_bf16_state_resumes_at_any_world_size_converts_and_exports(tmp_path):
    common = [*NO_BN, "run.max_steps=8", "checkpoint.save_every=4", "checkpoint.keep_last=5", "loss.unpg=true",
              "loss.sample_rate=0.5"]
    a = run_world(phases_worker, 2, str(tmp_path), [
        {"out": "a", "overrides": common + ["data.batch_size=12", "loss.state_dtype=bf16"],
         "kw": {"return_weights": True}}], DATA)
    assert a[0][0]["head"].dtype == torch.bfloat16
    full = _losses(a[0][0])
    state = _shard_weights(tmp_path / "a" / "checkpoints" / "step_00000004")
    assert state["head"]["weight"].dtype == torch.bfloat16
    assert state["optimizer"]["state"][0]["momentum_buffer"].dtype == torch.bfloat16
    # 2 -> 3 ranks, bf16 kept: re-sharded 16-bit centres and momentum
    c = run_world(phases_worker, 3, str(tmp_path), [
        {"out": "c", "overrides": common + ["data.batch_size=8", "loss.state_dtype=bf16"],
         "copy": "a/checkpoints/step_00000004", "kw": {"return_weights": True}}], DATA)
    assert [r[0]["class_range"] for r in c] == [(0, 11), (11, 22), (22, 32)]
    assert c[0][0]["start_step"] == 4 and c[0][0]["head"].dtype == torch.bfloat16
    got = _losses(c[0][0])
    assert abs(got[0] - full[4]) <= 1e-3 * abs(full[4]), (got, full[4:])  # first step: the same state
    torch.testing.assert_close(torch.tensor(got), torch.tensor(full[4:]), rtol=3e-2, atol=1e-2)
    # 2 -> 1 rank, state_dtype changed to fp32: converted with a warning (not a config error)
    d = run_world(phases_worker, 1, str(tmp_path), [
        {"out": "d", "overrides": common + ["data.batch_size=24", "loss.state_dtype=fp32"],
         "copy": "a/checkpoints/step_00000004", "kw": {"return_weights": True}}], DATA)[0][0]
    assert d["start_step"] == 4 and d["head"].dtype == torch.float32
    log = (tmp_path / "d" / "train.log").read_text()
    assert "stored as torch.bfloat16" in log and "converted on load (exact)" in log
    got = _losses(d)
    assert abs(got[0] - full[4]) <= 1e-3 * abs(full[4]), (got, full[4:])
    torch.testing.assert_close(torch.tensor(got), torch.tensor(full[4:]), rtol=3e-2, atol=1e-2)
    # merged export of the bf16 run: float32, equal to the bf16 shards widened
    obj = ck.export(tmp_path / "a", tmp_path / "a_export.pt")
    loaded = torch.load(tmp_path / "a_export.pt", weights_only=True)
    last = _shard_weights(tmp_path / "a" / "checkpoints" / "step_00000008")["head"]["weight"]
    assert loaded["head_weight"].dtype == torch.float32 and obj["step"] == 8
    assert torch.equal(loaded["head_weight"], last.float())
    assert torch.equal(torch.cat([r[0]["head"] for r in a]).float(), loaded["head_weight"])


def test_state_dtype_key_is_validated_and_does_not_block_resume():
    import pytest

    from trainer.config import ConfigError, config_diff, load_config, to_dict

    assert load_config(None, ["loss.state_dtype=bf16"]).loss.state_dtype == "bf16"
    with pytest.raises(ConfigError, match=r"loss\.state_dtype.*fp16.*'fp32', 'bf16'"):
        load_config(None, ["loss.state_dtype=fp16"])
    a, b = to_dict(load_config(None, [])), to_dict(load_config(None, ["loss.state_dtype=bf16", "loss.s=32"]))
    assert [k for k, _, _ in config_diff(a, b)] == ["loss.s"]  # converted on resume, not a change
