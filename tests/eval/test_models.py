"""--model resolution: state_dicts, run/checkpoint directories, TorchScript, module:factory, trainer backbones."""
import argparse
import json

import pytest
import torch

from eval.models import checkpoint_file, load_model, parse_kwargs
from tests.eval.fixtures import TinyNet, tiny_net

X = torch.rand(2, 3, 112, 112) * 2 - 1


def _same(a, b):
    with torch.no_grad():
        return torch.allclose(a(X), b(X), atol=1e-6)


def _other_weights(n=24):
    torch.manual_seed(123)
    return TinyNet(n).eval()


def test_state_dict_num_features_inferred(tmp_path):
    net = tiny_net(24)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    m = load_model(tmp_path / "model.pt", network="tests.eval.fixtures:TinyNet")
    assert _same(m, net) and not m.training


def test_run_directory_layouts(tmp_path):
    run = tmp_path / "run"
    ck = run / "checkpoints"
    good, newer_incomplete = tiny_net(24), _other_weights()
    cfg = {"model": {"backbone": "tests.eval.fixtures:TinyNet"}}
    for step, net, complete in ((10, good, True), (20, newer_incomplete, False)):
        d = ck / f"step_{step:08d}"
        d.mkdir(parents=True)
        torch.save({"backbone": net.state_dict(), "step": step, "config": cfg}, d / "trainer.pt")
        torch.save({"head": {"weight": torch.zeros(3, 24)}}, d / "shard_00000.pt")
        if complete:
            (d / "COMPLETE").write_text(json.dumps({"step": step}))
    net = "tests.eval.fixtures:TinyNet"  # a factory: only from the command line, never from the config
    # newest COMPLETE step wins over a newer incomplete one
    assert checkpoint_file(run) == ck / "step_00000010" / "trainer.pt"
    assert _same(load_model(run, network=net), good)
    assert _same(load_model(ck / "step_00000020", network=net), newer_incomplete)  # explicit step dir
    # final model.pt is preferred
    final = _other_weights()
    torch.save(final.state_dict(), run / "model.pt")
    (run / "config.yaml").write_text("model:\n  backbone: tests.eval.fixtures:TinyNet\n")
    assert _same(load_model(run, network=net), final)
    d = ck / "step_00000030"
    d.mkdir()
    torch.save({"backbone": final.state_dict()}, d / "trainer.pt")
    assert _same(load_model(d, network=net), final)


def test_factory_named_in_a_run_folder_is_never_called(tmp_path):
    """A run folder's config.yaml / checkpoint config naming `module:function` does not make
    eval import and call it (os:abort would end this test process)."""
    net = tiny_net(24)
    run = tmp_path / "run"
    run.mkdir()
    torch.save(net.state_dict(), run / "model.pt")
    (run / "config.yaml").write_text("model:\n  backbone: os:abort\n")
    with pytest.raises(ValueError, match=r"os:abort.*--network"):
        load_model(run)
    d = tmp_path / "step"
    d.mkdir()
    torch.save({"backbone": net.state_dict(), "config": {"model": {"backbone": "torch.hub:load"}}}, d / "trainer.pt")
    with pytest.raises(ValueError, match="torch.hub:load"):
        load_model(d)
    # the same factory given on the command line is the user's choice
    assert _same(load_model(run, network="tests.eval.fixtures:TinyNet"), net)
    # a TorchScript archive (code) is run only when named itself, not picked from a folder
    ts = tmp_path / "ts"
    ts.mkdir()
    torch.jit.script(net).save(str(ts / "weights.pt"))
    with pytest.raises(ValueError, match="TorchScript"):
        load_model(ts)
    assert _same(load_model(ts / "weights.pt"), net)


def test_backbone_kwargs_from_config_or_flag(tmp_path):
    torch.manual_seed(1)
    net = TinyNet(24, width=4).eval()
    run = tmp_path / "run"
    run.mkdir()
    torch.save(net.state_dict(), run / "model.pt")
    (run / "config.yaml").write_text("model:\n  backbone: tests.eval.fixtures:TinyNet\n  backbone_kwargs: {width: 4}\n")
    # the factory comes from the command line; its constructor options from the run's config
    assert _same(load_model(run, network="tests.eval.fixtures:TinyNet"), net)
    torch.save(net.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="do not fit"):
        load_model(tmp_path / "bare.pt", network="tests.eval.fixtures:TinyNet")  # default width 8
    assert _same(
        load_model(
            tmp_path / "bare.pt", network="tests.eval.fixtures:TinyNet", network_kwargs=parse_kwargs("{width: 4}")
        ),
        net,
    )
    with pytest.raises(argparse.ArgumentTypeError):
        parse_kwargs("[1, 2]")


def test_torchscript_factory_and_unsafe_pickle(tmp_path):
    net = tiny_net(8)
    torch.jit.script(net).save(str(tmp_path / "m.ts"))
    assert _same(load_model(tmp_path / "m.ts"), net)
    assert load_model("tests.eval.fixtures:patch_net")(X).shape == (2, 48)
    torch.save(net, tmp_path / "whole.pt")
    with pytest.raises(ValueError, match="--unsafe-load"):
        load_model(tmp_path / "whole.pt")
    assert _same(load_model(tmp_path / "whole.pt", unsafe_load=True), net)


def test_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_model(tmp_path / "nothing.pt", network="r50")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_model(tmp_path / "empty")
    torch.save({"optimizer": {"lr": 0.1}}, tmp_path / "opt.pt")
    with pytest.raises(ValueError, match="no backbone state_dict"):
        load_model(tmp_path / "opt.pt", network="tests.eval.fixtures:TinyNet")
    with pytest.raises(ValueError, match="cannot import module"):
        load_model("no_such_pkg.mod:fn")


def test_trainer_backbone_names(tmp_path):
    bb = pytest.importorskip("trainer.backbones")
    if not hasattr(bb, "get_backbone"):
        pytest.skip("trainer.backbones.get_backbone has not landed")
    net = bb.get_backbone("tiny", num_features=64).eval()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    assert _same(load_model(tmp_path / "model.pt", network="tiny"), net)
