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


class _Counter:
    """A state the checkpointer was never told about beyond its registration."""

    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def _checkpointer(out, states):
    from trainer.checkpointer import Checkpointer
    from trainer.runtime.process_group import DistInfo
    from trainer.section import CheckpointConfig

    d = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return Checkpointer(CheckpointConfig(save_every=1, keep_last=2), out, d, states, total_steps=10)


def test_checkpointer_saves_and_loads_every_registered_state(tmp_path):
    from trainer.heads import ArcFace, PartialFC, PartialFCSGD
    from trainer.state import RunHistory, TrainState

    head = PartialFC(ArcFace(s=8.0, m=0.2), 4, 5)
    opt = PartialFCSGD(head, lr=0.1, momentum=0.9)
    head(torch.randn(3, 4), torch.tensor([0, 1, 4])).backward()
    opt.step()
    state, hist, extra = TrainState(step=3, epoch=1, batch=2, samples=24, best={"lfw": 0.9}), RunHistory(), _Counter()
    hist.steps.append({"step": 3, "loss": 1.5, "kept_fraction": 0.5})
    extra.n = 7
    states = {"head": head, "head_opt": opt, "progress": state, "history": hist, "extra": extra}
    path = _checkpointer(tmp_path, states).save(3)
    trainer_pt = ck.load_file(path / "trainer.pt")
    assert trainer_pt["extra"] == {"n": 7} and trainer_pt["step"] == 3 and trainer_pt["best"] == {"lfw": 0.9}
    shard = ck.load_file(ck.shard_file(path, 0))
    assert set(shard) == {"class_range", "num_classes", "head", "optimizer", "rng"}
    w, m = head.weight.detach().clone(), opt.state[head.weight]["momentum_buffer"].clone()
    # new, empty parts: load() fills every one of them
    head2 = PartialFC(ArcFace(s=8.0, m=0.2), 4, 5)
    opt2 = PartialFCSGD(head2, lr=0.1, momentum=0.9)
    state2, hist2, extra2 = TrainState(), RunHistory(), _Counter()
    got = _checkpointer(tmp_path, {"head": head2, "head_opt": opt2, "progress": state2, "history": hist2,
                                   "extra": extra2}).load()
    assert got == path
    assert torch.equal(head2.weight.detach(), w) and torch.equal(opt2.state[head2.weight]["momentum_buffer"], m)
    assert (state2.step, state2.epoch, state2.batch, state2.samples, state2.best) == (3, 1, 2, 24, {"lfw": 0.9})
    assert hist2.steps == hist.steps and extra2.n == 7


def test_checkpointer_refuses_two_states_writing_one_key(tmp_path):
    import pytest

    from trainer.heads import ArcFace, PartialFC
    from trainer.state import TrainState

    with pytest.raises(ValueError, match=r"state 'step' writes \['step'\], already written"):
        _checkpointer(tmp_path, {"head": PartialFC(ArcFace(), 4, 5), "progress": TrainState(),
                                 "step": _Counter()}).save(1)
