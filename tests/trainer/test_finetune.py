"""Fine-tuning: model.init_from, loss.head_init=imprint, model.bn_mode, optim.freeze_backbone_steps,
optim.backbone_lr_scale (docs/finetune.md). References are written here from the definitions."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_world
from tests.trainer.synthetic import MemoryLoader, make_dataset
from tests.trainer.workers import tiny_config
from trainer.backbones import get_backbone
from trainer.config import ConfigError, load_config
from trainer.loop import Trainer
from trainer.pretrained import InitFromError, init_backbone

DATA = dict(identities=32, per_id=4, val_identities=4, val_pairs=10, seed=0)


def _trainer(rank, world, out, overrides, keep=None):
    cfg = tiny_config(Path(out), overrides)
    imgs, labels = make_dataset(**DATA)

    def factory(c, d):
        return MemoryLoader(imgs, labels, c.data.batch_size, d.rank, d.world_size, c.run.seed)

    return Trainer(cfg, factory).setup(), imgs, labels


def _tiny(**kw):
    return get_backbone("tiny", num_features=32, width=8, **kw)


# ------------------------------------------------------------ init_from: sources
def _source_files(tmp_path: Path, sd):
    files = {}
    files["plain"] = tmp_path / "plain.pth"
    torch.save(sd, files["plain"])
    files["ddp"] = tmp_path / "ddp.pth"
    torch.save({"module." + k: v for k, v in sd.items()}, files["ddp"])
    files["export"] = tmp_path / "export.pt"
    torch.save({"backbone": sd, "head_weight": torch.zeros(3, 32), "num_classes": 3, "step": 7}, files["export"])
    files["arcface_torch"] = tmp_path / "checkpoint_gpu_0.pt"
    torch.save({"epoch": 1, "global_step": 9, "state_dict_backbone": sd, "state_dict_softmax_fc": {}},
               files["arcface_torch"])
    return files


@pytest.mark.parametrize("kind", ["plain", "ddp", "export", "arcface_torch"])
def test_init_from_each_file_kind_loads_every_tensor(tmp_path, kind):
    torch.manual_seed(1)
    src = _tiny()
    path = _source_files(tmp_path, src.state_dict())[kind]
    torch.manual_seed(2)
    dst = _tiny()
    info = init_backbone(dst, str(path))
    assert info["loaded"] == len(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


@pytest.mark.parametrize("network", ["r18", "mbf"])
def test_init_from_insightface_state_dict(tmp_path, network):
    """A plain state dict in insightface's key names (what backbone.pth of the zoo holds)."""
    torch.manual_seed(0)
    src = get_backbone(network, num_features=512)
    torch.save(src.state_dict(), tmp_path / "backbone.pth")
    dst = get_backbone(network, num_features=512)
    init_backbone(dst, str(tmp_path / "backbone.pth"))
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_init_from_errors_name_the_problem(tmp_path):
    dst = _tiny()
    with pytest.raises(InitFromError, match="no such file"):
        init_backbone(dst, str(tmp_path / "missing.pth"))
    # another embedding size: the mis-shaped keys are listed with both shapes
    torch.save(get_backbone("tiny", num_features=64, width=8).state_dict(), tmp_path / "e64.pth")
    with pytest.raises(InitFromError) as e:
        init_backbone(dst, str(tmp_path / "e64.pth"))
    assert "mis-shaped" in str(e.value) and "(64," in str(e.value) and "(32," in str(e.value)
    # unexpected / missing keys listed
    sd = dst.state_dict()
    sd["extra.weight"] = torch.zeros(2)
    first = next(iter(sd))
    del sd[first]
    torch.save(sd, tmp_path / "keys.pth")
    with pytest.raises(InitFromError) as e:
        init_backbone(dst, str(tmp_path / "keys.pth"))
    assert "1 missing: " + first in str(e.value) and "1 unexpected: extra.weight" in str(e.value)
    # a pickle that would run code is refused, naming the file
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"conv.weight": Evil()}))
    with pytest.raises(InitFromError, match="evil.pth"):
        init_backbone(dst, str(tmp_path / "evil.pth"))
    # not weights at all
    torch.save({"a": 1}, tmp_path / "dict.pth")
    with pytest.raises(InitFromError, match="not backbone weights"):
        init_backbone(dst, str(tmp_path / "dict.pth"))


def test_init_strict_false_starts_differing_layers_fresh(tmp_path):
    torch.manual_seed(3)
    src = get_backbone("tiny", num_features=64, width=8)
    torch.save(src.state_dict(), tmp_path / "e64.pth")
    torch.manual_seed(4)
    dst = _tiny()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    info = init_backbone(dst, str(tmp_path / "e64.pth"), strict=False)
    assert info["mis_shaped"]
    bad = {line.split(":")[0] for line in info["mis_shaped"]}
    for k, v in dst.state_dict().items():
        want = before[k] if k in bad else src.state_dict()[k]
        assert torch.equal(v, want), k
    # another network entirely: an error even when not strict
    torch.save(get_backbone("mbf", num_features=32).state_dict(), tmp_path / "mbf.pth")
    with pytest.raises(InitFromError, match="another network"):
        init_backbone(_tiny(), str(tmp_path / "mbf.pth"), strict=False)


# ------------------------------------------------- init_from in the trainer / on resume
def _run_worker(rank, world, out, overrides):
    t, _, _ = _trainer(rank, world, out, overrides)
    init = {k: v.detach().clone() for k, v in t.backbone.state_dict().items()}
    start = t.step
    t.train()
    return {"init": init, "start": start,
            "final": {k: v.detach().clone() for k, v in t.backbone.state_dict().items()}}


def test_init_from_run_folder_and_ignored_on_resume(tmp_path):
    base = ["data.batch_size=8", "checkpoint.save_every=2"]
    src = run_world(_run_worker, 1, str(tmp_path / "src"), base + ["run.max_steps=2"])[0]
    # a run folder: its newest complete checkpoint's backbone
    ft = run_world(_run_worker, 1, str(tmp_path / "ft"),
                   base + ["run.max_steps=2", f"model.init_from={tmp_path / 'src'}"])[0]
    for k, v in src["final"].items():
        assert torch.equal(ft["init"][k], v), k
    # resume: the checkpoint wins, init_from is not read (the file may be gone)
    torch.save(src["final"], tmp_path / "w.pth")
    a = run_world(
        _run_worker, 1, str(tmp_path / "r"), base + ["run.max_steps=2", f"model.init_from={tmp_path / 'w.pth'}"]
    )[0]
    (tmp_path / "w.pth").unlink()
    b = run_world(
        _run_worker, 1, str(tmp_path / "r"), base + ["run.max_steps=4", f"model.init_from={tmp_path / 'w.pth'}"]
    )[0]
    assert b["start"] == 2
    for k, v in a["final"].items():
        assert torch.equal(b["init"][k], v), k
    # changing init_from on resume: a config-diff error
    with pytest.raises(RuntimeError, match="model.init_from"):
        run_world(_run_worker, 1, str(tmp_path / "r"), base + ["run.max_steps=6", "model.init_from=other.pth"])


# ------------------------------------------------------------------ imprint
def _imprint_worker(rank, world, out, overrides):
    t, _, _ = _trainer(rank, world, out, overrides)
    w = t.head.weight.detach().clone()
    bb = {k: v.detach().clone() for k, v in t.backbone.state_dict().items()}
    t.close()
    return {"range": tuple(t.head.class_range), "w": w, "backbone": bb,
            "momentum": [s.get("momentum_buffer") for s in t.head_opt.state.values()]}


def _reference_centres(backbone_sd, max_per_class=None):
    """From the definition: w_c = normalize(sum_i normalize(f(x_i))) over the class's images
    (the first max_per_class in stored order), f in eval mode; float64 sums."""
    imgs, labels = make_dataset(**DATA)
    f = _tiny()
    f.load_state_dict(backbone_sd)
    f.eval()
    with torch.no_grad():
        emb = F.normalize(f(imgs).double(), dim=1)
    out = torch.zeros(int(labels.max()) + 1, emb.shape[1], dtype=torch.float64)
    seen = {}
    for i, c in enumerate(labels.tolist()):
        seen[c] = seen.get(c, 0) + 1
        if max_per_class is None or seen[c] <= max_per_class:
            out[c] += emb[i]
    return F.normalize(out, dim=1).float()


@pytest.mark.parametrize("world", [1, 2, 3])
def test_imprint_equals_reference_at_any_world_size(tmp_path, world):
    extra = ["loss.sample_rate=0.5", "loss.unpg=true"] if world == 2 else []
    max_pc = 3 if world == 3 else None
    ov = ["data.batch_size=4", "run.max_steps=1", "loss.head_init=imprint"] + extra
    if max_pc:
        ov.append(f"loss.imprint_max_per_class={max_pc}")
    res = run_world(_imprint_worker, world, str(tmp_path / "run"), ov)
    want = _reference_centres(res[0]["backbone"], max_pc)
    got = torch.cat([r["w"] for r in res])
    assert [r["range"] for r in res][-1][1] == 32
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    assert all(m is None or not m.any() for r in res for m in r["momentum"])  # momentum starts at zero


# --------------------------------------------------------- BatchNorm modes, freezing
def _bn_worker(rank, world, out, overrides):
    t, imgs, labels = _trainer(rank, world, out, overrides)
    after_setup = {k: v.detach().clone() for k, v in t.backbone.state_dict().items()}
    res = t.train()
    return {"setup": after_setup, "final": {k: v.detach().clone() for k, v in t.backbone.state_dict().items()},
            "history": res["history"], "head": t.head.weight.detach().clone()}


def _reference_bn_stats(world, batch, k, seed):
    """Average over the first k batches of every rank (MemoryLoader's epoch-0 order) of each
    BatchNorm input's batch mean and unbiased variance (train mode: normalisation by batch
    statistics, so the inputs do not depend on the running statistics)."""
    imgs, labels = make_dataset(**DATA)
    torch.manual_seed(seed)  # the trainer's backbone init
    f = _tiny()
    f.train()
    bns = [m for m in f.modules() if isinstance(m, torch.nn.BatchNorm2d) or isinstance(m, torch.nn.BatchNorm1d)]
    acc = {id(m): [] for m in bns}
    hooks = [m.register_forward_pre_hook(lambda mod, inp: acc[id(mod)].append(inp[0].detach())) for m in bns]
    for r in range(world):
        loader = MemoryLoader(imgs, labels, batch, r, world, seed)
        loader.set_epoch(0)
        for b, (x, _) in enumerate(loader):
            if b == k:
                break
            with torch.no_grad():
                f(x)
    for h in hooks:
        h.remove()
    out = {}
    names = {id(m): n for n, m in f.named_modules()}
    for m in bns:
        xs = acc[id(m)]
        dims = [0] + list(range(2, xs[0].dim()))
        means = torch.stack([x.mean(dim=dims) for x in xs])
        vars_ = torch.stack([x.var(dim=dims, unbiased=True) for x in xs])
        out[names[id(m)]] = (means.mean(0), vars_.mean(0))
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_bn_recalibrate_equals_reference_pass(tmp_path, world):
    res = run_world(_bn_worker, world, str(tmp_path / "run"),
                    ["data.batch_size=8", "run.max_steps=1", "model.bn_mode=recalibrate",
                     "model.bn_recalibrate_batches=3", "run.seed=7"])
    ref = _reference_bn_stats(world, 8, 3, 7)
    assert ref
    for r in res:
        for name, (mean, var) in ref.items():
            torch.testing.assert_close(r["setup"][f"{name}.running_mean"], mean, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(r["setup"][f"{name}.running_var"], var, rtol=1e-4, atol=1e-5)


def test_bn_frozen_keeps_running_stats_and_trains_affine(tmp_path):
    res = run_world(_bn_worker, 1, str(tmp_path / "run"),
                    ["data.batch_size=8", "run.max_steps=4", "model.bn_mode=frozen"])[0]
    stats = [k for k in res["setup"] if k.endswith(("running_mean", "running_var"))]
    assert stats
    for k in stats:
        assert torch.equal(res["final"][k], res["setup"][k]), k
    bn_w = [k for k in stats if k.endswith("running_mean")][0].replace("running_mean", "weight")
    assert not torch.equal(res["final"][bn_w], res["setup"][bn_w])  # affine parameters train
    assert all(h["loss"] == h["loss"] for h in res["history"])  # finite: no NaN from frozen BN here


def test_freeze_backbone_steps_keeps_backbone_bit_identical(tmp_path):
    frozen = run_world(_bn_worker, 1, str(tmp_path / "a"),
                       ["data.batch_size=8", "run.max_steps=3", "optim.freeze_backbone_steps=3"])[0]
    for k, v in frozen["setup"].items():
        assert torch.equal(frozen["final"][k], v), k  # weights and BN statistics
    # the head trained meanwhile, and the backbone trains after the frozen steps
    later = run_world(_bn_worker, 1, str(tmp_path / "b"),
                      ["data.batch_size=8", "run.max_steps=5", "optim.freeze_backbone_steps=3"])[0]
    assert not torch.equal(later["final"]["fc.weight"], later["setup"]["fc.weight"])
    assert not torch.equal(later["head"], frozen["head"])  # the head trained on


def test_backbone_lr_scale_and_config_checks(tmp_path):
    cfg = tiny_config(tmp_path / "x", ["optim.backbone_lr_scale=0.1", "optim.head_lr=0.5"])
    imgs, labels = make_dataset(**DATA)
    t = Trainer(cfg, lambda c, d: MemoryLoader(imgs, labels, 8, d.rank, d.world_size, c.run.seed)).setup()
    try:
        assert t.engine.backbone_opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.1)
        assert t.head_opt.param_groups[0]["lr"] == pytest.approx(0.5)
    finally:
        t.close()
    for bad in ("model.bn_mode=eval", "loss.head_init=mean", "optim.backbone_lr_scale=-1",
                "optim.freeze_backbone_steps=-2", "loss.imprint_max_per_class=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad])
    with pytest.raises(ConfigError, match="freeze_backbone_steps"):
        load_config(None, ["optim.freeze_backbone_steps=5", "engine.name=deepspeed"])
