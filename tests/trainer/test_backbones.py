"""Backbones: insightface key/shape compatibility, registry, tiny CNN cost."""
import json
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from trainer.backbones import available_backbones, get_backbone

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "iresnet_keys.json")


@pytest.mark.parametrize("name", ["r18", "r50", "r100"])
def test_iresnet_state_dict_matches_insightface_table(name):
    expected = json.load(open(FIXTURE))[name]
    got = {k: list(v.shape) for k, v in get_backbone(name, num_features=512).state_dict().items()}
    assert set(got) == set(expected), (sorted(set(got) ^ set(expected)))[:10]
    bad = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    assert not bad, bad
    # A released checkpoint (simulated by the fixture's table) loads strictly.
    sd = {k: torch.zeros(s) if s else torch.tensor(0) for k, s in expected.items()}
    get_backbone(name).load_state_dict(sd, strict=True)


def test_iresnet_forward_and_names():
    m = get_backbone("iresnet18", num_features=128).eval()
    assert m(torch.randn(2, 3, 112, 112)).shape == (2, 128)
    # the trainer's autocast covers the trunk; the embedding layers stay in the weights' dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(torch.randn(2, 3, 112, 112)).dtype == torch.float32
    assert not m.features.weight.requires_grad  # fixed as in arcface_torch
    for n in ("r18", "r34", "r50", "r100", "r200", "mbf", "tiny"):
        assert n in available_backbones()
    with pytest.raises(ValueError, match="valid: .*r100"):
        get_backbone("resnet9000")


def test_mbf_shapes():
    m = get_backbone("mbf", num_features=512).eval()
    assert m(torch.randn(2, 3, 112, 112)).shape == (2, 512)
    sd = m.state_dict()
    assert sd["layers.0.layers.0.weight"].shape == (128, 3, 3, 3)
    assert sd["conv_sep.layers.0.weight"].shape == (512, 256, 1, 1)
    assert sd["features.layers.0.layers.0.weight"].shape == (512, 1, 7, 7)
    assert sd["features.layers.2.weight"].shape == (512, 512)


def test_tiny_flops_budget_and_grad_checkpointing():
    m = get_backbone("tiny", num_features=512).eval()
    with FlopCounterMode(display=False) as fc:
        m(torch.randn(1, 3, 112, 112))
    mflops = fc.get_total_flops() / 1e6
    assert mflops <= 60, mflops
    with FlopCounterMode(display=False) as fc:
        get_backbone("r18").eval()(torch.randn(1, 3, 112, 112))
    assert fc.get_total_flops() / 1e6 > 40 * mflops  # actually much cheaper than iresnet18

    torch.manual_seed(0)
    a = get_backbone("r18", num_features=8)
    b = get_backbone("r18", num_features=8, grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 112, 112, requires_grad=True)
    a(x).sum().backward()
    ga = a.conv1.weight.grad.clone()
    b(x).sum().backward()
    torch.testing.assert_close(b.conv1.weight.grad, ga, rtol=1e-4, atol=1e-5)


def test_uniform_options_and_clear_errors():
    assert get_backbone("tiny", num_features=16, width=4, norm="none", dropout=None).fc.in_features == 8 * 4 * 49
    with pytest.raises(ValueError, match="'mbf' has no option 'dropout'"):
        get_backbone("mbf", dropout=0.1)
    with pytest.raises(ValueError, match="'r18' has no option 'width'"):
        get_backbone("r18", width=8)
