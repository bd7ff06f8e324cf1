"""GPU tests (``pytest -m gpu``; skipped without CUDA). Run by ``scripts/device_check.sh`` (stage gpu_tests).

- the head on CUDA equals the float64 CPU reference (ArcFace/CosFace/Combined x UNPG x r);
- bf16 / fp16 autocast within stated tolerances;
- no host sync in steady-state training steps (``set_sync_debug_mode``): tests/gpu/test_cuda_trainer.py;
- fp16 GradScaler with the sparse head;
- one-process NCCL training with checkpoint and resume: tests/gpu/test_cuda_trainer.py;
- DALI mixed decode equals the CPU decode (when DALI is installed).
"""
import pytest
import torch

from tests.heads.reference import MARGINS, make_margin, reference_loss
from trainer.heads import UNPG, PartialFC, PartialFCSGD

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

D, C = 16, 37


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (n,), generator=g)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    return x, y, w


@pytest.mark.parametrize("kind", sorted(MARGINS))
@pytest.mark.parametrize("wisk", [None, 1.5])
@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_head_on_cuda_equals_float64_reference(kind, wisk, rate):
    x, y, w = _data()
    s = 16.0
    head = PartialFC(make_margin(kind, s), D, C, sample_rate=rate, unpg=None if wisk is None else UNPG(wisk=wisk),
                     device=torch.device("cuda"))
    with torch.no_grad():
        head.weight.copy_(w.float())
    xc = x.float().cuda().requires_grad_(True)
    loss = head(xc, y.cuda())
    loss.backward()
    used = head.sampled_classes
    cols = torch.arange(C) if used is None else used.cpu()
    # the reference over the classes the step used (all of them when rate = 1)
    remap = torch.full((C,), -1, dtype=torch.long)
    remap[cols] = torch.arange(cols.numel())
    x2 = x.clone().requires_grad_(True)
    w2 = w[cols].clone().requires_grad_(True)
    ref = reference_loss(x2, remap[y], w2, kind, MARGINS[kind], s, wisk)
    ref.backward()
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xc.grad.double().cpu(), x2.grad, rtol=1e-3, atol=1e-4)
    g = head.weight.grad
    g = (g.to_dense() if g.is_sparse else g).double().cpu()[cols]
    torch.testing.assert_close(g, w2.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 1e-2)])
def test_autocast_within_tolerance(dtype, tol):
    x, y, w = _data(64)
    head = PartialFC(make_margin("arcface", 32.0), D, C, unpg=UNPG(wisk=1.5), device=torch.device("cuda"))
    with torch.no_grad():
        head.weight.copy_(w.float())
    lin = torch.nn.Linear(D, D).cuda()
    ref = head(lin(x.float().cuda()), y.cuda())
    with torch.autocast("cuda", dtype=dtype):
        half = head(lin(x.float().cuda()), y.cuda())
    assert abs(float(half) - float(ref)) <= tol * abs(float(ref))


def test_fp16_gradscaler_with_sparse_head():
    """The CPU test (tests/trainer/test_precision.py) on CUDA: an overflow skips both optimizers."""
    from trainer.backbones import get_backbone
    from trainer.engine.config import EngineConfig
    from trainer.engine.ddp import DDPEngine
    from trainer.optim import OptimConfig, optimizer_factory
    from trainer.runtime.process_group import DistInfo

    dev = torch.device("cuda")
    bb = get_backbone("tiny", num_features=D, width=8, norm="none").to(dev)
    head = PartialFC(make_margin("arcface", 16.0), D, C, sample_rate=0.5, device=dev)
    eng = DDPEngine(EngineConfig(precision="fp16"), optimizer_factory(OptimConfig(lr=0.01)), 5.0, bb, head,
                    PartialFCSGD(head, lr=0.01), DistInfo(0, 1, 0, dev), 1, "fp16")
    eng.scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 24)
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = iter([(torch.rand(16, 3, 112, 112, device=dev, generator=g) * 2 - 1,
                     torch.randint(0, C, (16,), device=dev, generator=g)) for _ in range(40)])
    w0 = head.weight.detach().clone()
    eng.train_step(lambda: next(batches))
    assert torch.equal(w0, head.weight.detach()) and eng.loss_scale() == 2.0 ** 23
    for _step in range(2, 30):
        out = eng.train_step(lambda: next(batches))
        if not bool(out.skipped):
            break
    assert not torch.equal(w0, head.weight.detach())


def test_dali_mixed_decode_equals_cpu_decode(tmp_path):
    pytest.importorskip("nvidia.dali")
    from data_tools.synth import generate_dataset
    from trainer.data import build_train_loader

    generate_dataset(tmp_path, 8, 4, seed=0, workers=1, val_pairs=0, val_identities=0)
    kw = dict(batch_size=8, backend="dali", num_threads=1, seed=3, shuffle=False, flip=False)
    cpu = next(iter(build_train_loader(tmp_path, device=torch.device("cpu"), **kw)))
    gpu = next(iter(build_train_loader(tmp_path, device=torch.device("cuda"), **kw)))
    # uint8 NHWC from both; nvJPEG and libjpeg-turbo may differ by a grey level or two
    assert gpu[0].dtype == torch.uint8 and gpu[0].is_cuda
    assert (gpu[0].cpu().int() - cpu[0].int()).abs().max() <= 2
    assert torch.equal(gpu[1].cpu(), cpu[1])
