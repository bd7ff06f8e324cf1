"""Re-sharding and checkpoint bookkeeping without training."""
import torch

from trainer import checkpoint as ck


def _ranges(C, R):
    base, extra = divmod(C, R)
    out, s = [], 0
    for r in range(R):
        n = base + (1 if r < extra else 0)
        out.append((s, s + n))
        s += n
    return out


def _write(ckpt, full_w, full_m, R):
    rs = _ranges(len(full_w), R)
    for r, (s, e) in enumerate(rs):
        ck.write_shard(ckpt, r, {"class_range": (s, e), "head": {"weight": full_w[s:e].clone()},
                                 "optimizer": {"state": {0: {"momentum_buffer": full_m[s:e].clone()}},
                                               "param_groups": [{"lr": 0.1, "params": [0]}]}})
    ck.finish_save(ckpt, 5, R, rs, keep_last=3)
    return rs


def test_reshard_round_trip(tmp_path):
    C = 11
    w, m = torch.randn(C, 4), torch.randn(C, 4)
    ckpt = tmp_path / "step_00000005"
    _write(ckpt, w, m, 2)
    for R in (1, 3, 4):
        got_w, got_m = [], []
        for _r, rng in enumerate(_ranges(C, R)):
            shard = ck.load_shard_for_range(ckpt, rng, ck.read_marker(ckpt)["class_ranges"])
            assert shard["head"]["weight"].shape[0] == rng[1] - rng[0]
            assert shard["optimizer"]["param_groups"][0]["lr"] == 0.1
            got_w.append(shard["head"]["weight"])
            got_m.append(shard["optimizer"]["state"][0]["momentum_buffer"])
        assert torch.equal(torch.cat(got_w), w) and torch.equal(torch.cat(got_m), m)


def test_incomplete_and_pruning(tmp_path):
    w = torch.randn(6, 2)
    for step in (1, 2, 3, 4):
        _write(ck.checkpoint_dir(tmp_path, step), w, w, 2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [2, 3, 4]  # keep_last=3
    # a save that crashed midway: files but no marker -> ignored by resume
    bad = ck.checkpoint_dir(tmp_path, 5)
    bad.mkdir()
    (bad / "trainer.pt").write_bytes(b"partial")
    assert ck.find_resume_candidates("auto", tmp_path)[0].name == "step_00000004"
