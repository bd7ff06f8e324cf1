"""fp16 (autocast + GradScaler) and bf16 on the CPU, with the sparse Partial FC head."""
import pytest
import torch

from trainer.backbones import get_backbone
from trainer.config import EngineConfig, OptimConfig
from trainer.engine.ddp import DDPEngine
from trainer.heads import ArcFace, PartialFC, PartialFCSGD
from trainer.optim import optimizer_factory
from trainer.runtime.process_group import DistInfo

C, D = 40, 32


def _engine(precision, seed=0, init_scale=None):
    torch.manual_seed(seed)
    backbone = get_backbone("tiny", num_features=D, width=8, norm="none")
    head = PartialFC(ArcFace(s=16.0, m=0.3), D, C, sample_rate=0.5)  # sparse head gradient
    head_opt = PartialFCSGD(head, lr=0.01, momentum=0.9, weight_decay=5e-4)
    eng = DDPEngine(EngineConfig(precision=precision), optimizer_factory(OptimConfig(lr=0.01)), 5.0, backbone, head,
                    head_opt, DistInfo(0, 1, 0, torch.device("cpu")), 1, precision)
    if init_scale is not None:
        eng.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return eng


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(16, 3, 112, 112, generator=g) * 2 - 1, torch.randint(0, C, (16,), generator=g))
            for _ in range(n)]


def _weights(eng):
    return [p.detach().clone() for p in eng.backbone.parameters()] + [eng.head.weight.detach().clone()]


def test_fp16_scaler_skips_both_optimizers_on_inf_then_trains():
    eng = _engine("fp16", init_scale=2.0 ** 24)  # scaled fp16 gradients overflow to inf
    batches = iter(_batches(40))
    before = _weights(eng)
    out = eng.train_step(lambda: next(batches))
    assert bool(out.skipped) and torch.isfinite(out.loss) and not torch.isfinite(out.grad_norm)
    for a, b in zip(before, _weights(eng)):
        assert torch.equal(a, b)  # neither the backbone nor the head moved
    assert eng.head_opt.state_dict()["state"] == {} or all(
        torch.count_nonzero(v["momentum_buffer"]) == 0 for v in eng.head_opt.state_dict()["state"].values())
    assert eng.loss_scale() == 2.0 ** 23  # backed off
    # the scale keeps backing off until the gradients fit, then both optimizers step
    for _step in range(2, 30):
        out = eng.train_step(lambda: next(batches))
        if not bool(out.skipped):
            break
    assert torch.isfinite(out.grad_norm) and eng.loss_scale() < 2.0 ** 23
    after = _weights(eng)
    assert any(not torch.equal(a, b) for a, b in zip(before[:-1], after[:-1]))  # backbone updated
    assert not torch.equal(before[-1], after[-1])  # head rows updated (sparse step)
    # and training goes on with finite losses
    for _k in range(5):
        assert torch.isfinite(eng.train_step(lambda: next(batches)).loss)


@pytest.mark.parametrize("precision, tol", [("fp16", 1e-2), ("bf16", 2e-2)])
def test_half_precision_loss_close_to_fp32(precision, tol):
    """Same weights and batch: the loss under autocast is within ``tol`` (relative) of fp32's."""
    batch = _batches(1)[0]
    ref = _engine("fp32")
    half = _engine(precision)
    half.backbone.load_state_dict(ref.backbone.state_dict())
    half.head.load_state_dict(ref.head.state_dict())
    torch.manual_seed(3)
    l32 = float(ref.train_step(lambda: batch).loss)
    torch.manual_seed(3)
    lh = float(half.train_step(lambda: batch).loss)
    assert abs(lh - l32) <= tol * abs(l32), (lh, l32)
