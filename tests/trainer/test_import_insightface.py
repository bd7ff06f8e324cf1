"""Import of arcface_torch output folders, export of merged checkpoints, margin buffers on reshard.

The source files are written here in arcface_torch's format: per-rank
``checkpoint_gpu_{rank}.pt`` with its key names, the head weight rows of each
rank split as arcface_torch's PartialFC_V2 splits them (num_local = C // R +
(rank < C % R)), and ONE SGD over [backbone params] + [head weight] per rank.
"""
import copy

import pytest
import torch

from trainer import checkpoint as ck
from trainer.backbones import get_backbone
from trainer.collectives import class_range
from trainer.heads import AdaFace, CurricularFace, PartialFC, PartialFCSGD
from trainer.import_insightface import InsightfaceImportError, import_run, main

C, D = 11, 8


def _arcface_split(num_classes, rank, world):
    num_local = num_classes // world + int(rank < num_classes % world)
    start = num_classes // world * rank + min(rank, num_classes % world)
    return start, start + num_local


def make_source(folder, world=4, num_classes=C, extra_row_rank=None, step=1234, epoch=3, log=True):
    """An arcface_torch output folder; returns (backbone state, full head weight, head momentum,
    backbone momentum by parameter index). ``log``: write training.log with arcface_torch's
    config dump (where the class count is read from)."""
    folder.mkdir(parents=True, exist_ok=True)
    if log:
        (folder / "training.log").write_text(
            "Training: 2024-01-01 10:00:00,000-: network                  r50\n"
            f"Training: 2024-01-01 10:00:00,001-: num_classes              {num_classes}\n"
            "Training: 2024-01-01 10:00:00,002-: num_epoch                20\n")
    torch.manual_seed(0)
    base = get_backbone("tiny", num_features=D)
    g = torch.Generator().manual_seed(1)
    w_full = torch.randn(num_classes, D, generator=g)
    gw_full = torch.randn(num_classes, D, generator=g)
    bb_grads = [torch.randn(p.shape, generator=g) for p in base.parameters()]
    weights, moms = [], []
    for rank in range(world):
        s, e = _arcface_split(num_classes, rank, world)
        if rank == extra_row_rank:
            e += 1
        bb = copy.deepcopy(base)
        head = torch.nn.Parameter(torch.cat([w_full, w_full])[s:e].clone())
        opt = torch.optim.SGD([{"params": bb.parameters()}, {"params": [head]}], lr=0.1, momentum=0.9,
                              weight_decay=5e-4)
        for p, gr in zip(bb.parameters(), bb_grads):
            p.grad = gr.clone()
        head.grad = torch.cat([gw_full, gw_full])[s:e].clone()
        opt.step()
        torch.save({"epoch": epoch, "global_step": step, "state_dict_backbone": bb.state_dict(),
                    "state_dict_softmax_fc": {"weight": head.detach()},
                    "state_optimizer": opt.state_dict(),
                    "state_lr_scheduler": {"last_epoch": step, "base_lrs": [0.1, 0.1]}},
                   folder / f"checkpoint_gpu_{rank}.pt")
        weights.append(head.detach().clone())
        moms.append(opt.state[head]["momentum_buffer"].clone())
        bb_mom = [opt.state[p]["momentum_buffer"].clone() for p in bb.parameters()]
        bb_state = bb.state_dict()
    torch.save(bb_state, folder / "model.pt")
    return bb_state, torch.cat(weights), torch.cat(moms), bb_mom


@pytest.mark.parametrize("new_world", [3, 1, 4])
def test_four_rank_source_resumes_at_any_world_size(tmp_path, new_world):
    bb_state, w, mom, bb_mom = make_source(tmp_path / "src")
    ckpt = import_run(tmp_path / "src", tmp_path / "run", network="tiny")
    assert ck.list_checkpoints(tmp_path / "run" / "checkpoints") == [(1234, ckpt)]
    got_w, got_m = [], []
    for rank in range(new_world):
        rng = class_range(C, rank, new_world)
        meta, state, shard = ck.load_for_rank(ckpt, rank, new_world, rng)
        assert meta["world_size"] == 4 and state["step"] == 1234 and state["epoch"] == 3
        assert state["num_classes"] == C and state["batch"] == 0
        assert shard["head"]["weight"].shape == (rng[1] - rng[0], D)
        got_w.append(shard["head"]["weight"])
        got_m.append(shard["optimizer"]["state"][0]["momentum_buffer"])
        # loads into the trainer's own optimizers
        p = torch.nn.Parameter(shard["head"]["weight"].clone())
        PartialFCSGD([p], lr=0.1).load_state_dict(shard["optimizer"])
    torch.testing.assert_close(torch.cat(got_w), w, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(got_m), mom, rtol=0, atol=0)
    # backbone weights and momentum
    model = get_backbone("tiny", num_features=D)
    model.load_state_dict(state["backbone"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(state["optimizer"])
    for p, m in zip(model.parameters(), bb_mom):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], m, rtol=0, atol=0)
    assert state["scheduler"]["step_num"] == 1234


def test_rows_that_do_not_add_up_name_the_files(tmp_path):
    make_source(tmp_path / "src", extra_row_rank=2)
    with pytest.raises(InsightfaceImportError, match=r"checkpoint_gpu_2\.pt: 4"):
        import_run(tmp_path / "src", tmp_path / "run")
    make_source(tmp_path / "src2")
    with pytest.raises(InsightfaceImportError, match=r"add up to 11, not the class count 12.*checkpoint_gpu_0"):
        import_run(tmp_path / "src2", tmp_path / "run", num_classes=12)
    (tmp_path / "src2" / "checkpoint_gpu_1.pt").unlink()
    with pytest.raises(InsightfaceImportError, match="checkpoint_gpu_1.pt"):
        import_run(tmp_path / "src2", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_bad_files_clear_errors_and_cli(tmp_path, capsys):
    make_source(tmp_path / "src")
    # wrong network: named
    assert main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "run"), "--network", "r50"]) == 2
    assert "does not match --network r50" in capsys.readouterr().err
    # a file holding code (a pickled object) is refused, not run
    torch.save({"epoch": 1, "global_step": 2, "x": torch.nn.Linear(2, 2)}, tmp_path / "src" / "checkpoint_gpu_0.pt")
    assert main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "run")]) == 2
    assert "weights_only" in capsys.readouterr().err
    # model.pt only: needs --num-classes, then a fresh head on the imported backbone
    only = tmp_path / "only"
    only.mkdir()
    (tmp_path / "src" / "model.pt").rename(only / "model.pt")
    assert main(["--src", str(only), "--out", str(tmp_path / "run2")]) == 2
    assert "--num-classes" in capsys.readouterr().err
    assert main(["--src", str(only), "--out", str(tmp_path / "run2"), "--num-classes", "5"]) == 0
    _, ck_path = ck.list_checkpoints(tmp_path / "run2" / "checkpoints")[0]
    _, state, shard = ck.load_for_rank(ck_path, 0, 1, (0, 5))
    assert shard["head"]["weight"].shape == (5, D) and state["step"] == 0


def test_export_merges_shards(tmp_path):
    bb_state, w, _, _ = make_source(tmp_path / "src")
    import_run(tmp_path / "src", tmp_path / "run")
    out = tmp_path / "merged.pt"
    assert ck.main(["export", str(tmp_path / "run"), "--out", str(out)]) == 0
    obj = torch.load(out, weights_only=True)
    assert set(obj) == {"backbone", "head_weight", "num_classes", "step"}
    assert obj["num_classes"] == C and obj["step"] == 1234
    torch.testing.assert_close(obj["head_weight"], w, rtol=0, atol=0)
    assert set(obj["backbone"]) == set(bb_state)
    for k in bb_state:
        assert torch.equal(obj["backbone"][k], bb_state[k])
    assert ck.main(["export", str(tmp_path / "nothing"), "--out", str(out)]) == 2


def test_head_state_without_margin_state_loads_with_initial_statistics():
    """An imported (or ArcFace) head state has only the weight: running statistics start fresh."""
    w = torch.randn(C, D)
    for margin, initial in ((AdaFace(), {"batch_mean": 20.0, "batch_std": 100.0}), (CurricularFace(), {"t": 0.0})):
        head = PartialFC(margin, D, C)
        head.load_state_dict({"weight": w})
        assert torch.equal(head.weight, w)
        assert {k: float(getattr(head.margin, k)) for k in initial} == initial
        with pytest.raises(RuntimeError, match="weight"):
            head.load_state_dict({"margin." + next(iter(initial)): torch.tensor(1.0)})


def test_margin_buffers_survive_resharding(tmp_path):
    """Non-row head state (AdaFace/CurricularFace buffers) is carried, not sliced, at a new world size."""
    for margin in (AdaFace(), CurricularFace()):
        ckpt = tmp_path / type(margin).__name__ / "step_00000007"
        full = torch.randn(C, D)
        ranges = [class_range(C, r, 4) for r in range(4)]
        for r, (s, e) in enumerate(ranges):
            head = PartialFC(type(margin)(), D, C)
            sd = head.state_dict()
            sd["weight"] = full[s:e].clone()
            for k in sd:
                if k.startswith("margin."):
                    sd[k] = torch.tensor(3.5 + len(k))
            ck.write_shard(ckpt, r, {"class_range": (s, e), "head": sd,
                                     "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}})
        ck.finish_save(ckpt, 7, 4, ranges, keep_last=3)
        for new_world in (1, 3, 11):
            for r in range(new_world):
                rng = class_range(C, r, new_world)
                shard = ck.load_shard_for_range(ckpt, rng, ranges)
                head = PartialFC(type(margin)(), D, C)
                head.weight = torch.nn.Parameter(torch.empty(rng[1] - rng[0], D))
                head.load_state_dict(shard["head"])
                assert torch.equal(head.weight, full[rng[0]:rng[1]])
                for k, v in head.state_dict().items():
                    if k.startswith("margin."):
                        assert float(v) == 3.5 + len(k)


# ------------------------------------------------- end to end: train, 4-rank arcface files, resume at 3
def _to_arcface_format(ckpt, folder, world):
    """Our checkpoint -> arcface_torch's per-rank files (its key names, split rule, one SGD)."""
    meta = ck.read_marker(ckpt)
    num_classes = meta["class_ranges"][-1][1]
    state = torch.load(ckpt / "trainer.pt", weights_only=False)
    full = ck.load_shard_for_range(ckpt, (0, num_classes), meta["class_ranges"])
    w, mom = full["head"]["weight"], full["optimizer"]["state"][0]["momentum_buffer"]
    bb_opt = state["optimizer"]
    n_bb = len(bb_opt["param_groups"][0]["params"])
    folder.mkdir(parents=True)
    for rank in range(world):
        s, e = _arcface_split(num_classes, rank, world)
        opt_state = {i: {"momentum_buffer": bb_opt["state"][i]["momentum_buffer"]} for i in range(n_bb)}
        opt_state[n_bb] = {"momentum_buffer": mom[s:e].clone()}
        g0 = {**bb_opt["param_groups"][0], "params": list(range(n_bb))}
        g1 = {**full["optimizer"]["param_groups"][0], "params": [n_bb]}
        torch.save({"epoch": state["epoch"], "global_step": state["step"],
                    "state_dict_backbone": state["backbone"], "state_dict_softmax_fc": {"weight": w[s:e].clone()},
                    "state_optimizer": {"state": opt_state, "param_groups": [g0, g1]},
                    "state_lr_scheduler": {"last_epoch": state["step"]}}, folder / f"checkpoint_gpu_{rank}.pt")
    return state


def test_two_rank_run_continues_at_three_ranks_from_imported_four_rank_checkpoint(tmp_path):
    from tests.distributed import run_world
    from tests.trainer.workers import phases_worker

    data = dict(identities=32, per_id=8, val_identities=16, val_pairs=100, seed=0)
    common = ["model.width=8", "model.norm=none", "run.max_steps=14", "checkpoint.save_every=10",
              "checkpoint.keep_last=5", "loss.unpg=true"]
    src = run_world(phases_worker, 2, str(tmp_path), [
        {"out": "a", "overrides": common + ["data.batch_size=12"]}], data)[0][0]
    losses = [h["loss"] for h in src["history"]]
    state = _to_arcface_format(tmp_path / "a" / "checkpoints" / "step_00000010", tmp_path / "arc", 4)
    assert state["step"] == 10
    import_run(tmp_path / "arc", tmp_path / "b", num_classes=32)
    res = run_world(phases_worker, 3, str(tmp_path), [
        {"out": "b", "overrides": common + ["data.batch_size=8"]}], data)
    assert [r[0]["class_range"] for r in res] == [(0, 11), (11, 22), (22, 32)]
    b = res[0][0]
    assert b["start_step"] == 10
    resumed = [h["loss"] for h in b["history"]]
    assert len(resumed) == 4
    print(f"source (2 ranks) losses steps 1-14: {[round(v, 3) for v in losses]}; "
          f"imported 4-rank step 10, resumed at 3 ranks, steps 11-14: {[round(v, 3) for v in resumed]}")
    # continues where the source was (same step, weights, momentum, lr), not from scratch
    assert abs(resumed[0] - losses[10]) < 0.15 * losses[10], (losses, resumed)
    assert resumed[0] < 0.8 * losses[0], (losses, resumed)


def _resave(path, **fields):
    d = torch.load(path, weights_only=True)
    d.update(fields)
    torch.save(d, path)


@pytest.mark.parametrize("fields, message", [
    ({"global_step": -5}, r"checkpoint_gpu_2\.pt: field 'global_step' = -5 is out of range"),
    ({"global_step": 10 ** 12}, r"checkpoint_gpu_2\.pt: field 'global_step' = 1000000000000 is out of range"),
    ({"global_step": "12"}, r"checkpoint_gpu_2\.pt: field 'global_step' must be an integer, got '12'"),
    ({"global_step": 12.5}, r"checkpoint_gpu_2\.pt: field 'global_step' must be an integer"),
    ({"epoch": -1}, r"checkpoint_gpu_2\.pt: field 'epoch' = -1 is out of range"),
    ({"epoch": 5000}, r"checkpoint_gpu_2\.pt: field 'epoch' = 5000 is out of range \[0, 1234\]"),
    ({"state_dict_softmax_fc": torch.zeros(3, D)}, r"checkpoint_gpu_2\.pt: field 'state_dict_softmax_fc' must be a "
                                                   r"state_dict"),
    ({"state_dict_softmax_fc": {"weight": torch.zeros(3, D, dtype=torch.int64)}},
     r"checkpoint_gpu_2\.pt: field 'state_dict_softmax_fc\.weight' must be a 2-D float tensor"),
    ({"state_dict_softmax_fc": {"weight": torch.full((3, D), float("nan"))}}, r"non-finite"),
    ({"state_optimizer": {"state": {}, "param_groups": []}}, r"checkpoint_gpu_2\.pt: field 'state_optimizer'"),
    ({"state_dict_backbone": [1, 2]}, r"checkpoint_gpu_2\.pt: field 'state_dict_backbone'"),
])
def test_every_field_is_checked_naming_file_and_field(tmp_path, fields, message, capsys):
    make_source(tmp_path / "src")
    _resave(tmp_path / "src" / "checkpoint_gpu_2.pt", **fields)
    with pytest.raises(InsightfaceImportError, match=message):
        import_run(tmp_path / "src", tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written, not even the folder
    assert main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "checkpoint_gpu_2.pt" in err and "Traceback" not in err


def test_a_missing_last_rank_file_is_an_error(tmp_path):
    """12 classes over 4 ranks: 3 rows each; without checkpoint_gpu_3.pt the other three are a
    consistent 9-class split, so only the class count (training.log / --num-classes) tells."""
    make_source(tmp_path / "src", num_classes=12)
    (tmp_path / "src" / "checkpoint_gpu_3.pt").unlink()
    with pytest.raises(InsightfaceImportError, match=r"add up to 9, not the class count 12: a rank file is missing"):
        import_run(tmp_path / "src", tmp_path / "run")
    with pytest.raises(InsightfaceImportError, match=r"add up to 9, not the class count 12"):
        import_run(tmp_path / "src", tmp_path / "run", num_classes=12)
    # without training.log and without --num-classes the count is unknown: refused, not guessed
    (tmp_path / "src" / "training.log").unlink()
    with pytest.raises(InsightfaceImportError, match=r"class count is unknown.*--num-classes"):
        import_run(tmp_path / "src", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_import_refuses_a_run_folder_in_use(tmp_path, capsys):
    import subprocess
    import sys
    from pathlib import Path

    from trainer.runtime.run_lock import RunLockedError

    make_source(tmp_path / "src")
    run = tmp_path / "run"
    run.mkdir()
    root = Path(__file__).resolve().parents[2]
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from trainer.runtime.run_lock import RunLock\nRunLock(Path(sys.argv[1])).acquire()\n"
                               "print('held', flush=True)\ntime.sleep(120)", str(run)],
                              cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=str(run)):
            import_run(tmp_path / "src", run)
        assert main(["--src", str(tmp_path / "src"), "--out", str(run)]) == 4
        assert "error: " in capsys.readouterr().err
        assert not (run / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    import_run(tmp_path / "src", run)  # free again: imports
    assert ck.list_checkpoints(run / "checkpoints")
