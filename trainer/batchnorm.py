"""BatchNorm handling for fine-tuning (``model.bn_mode``, ``optim.freeze_backbone_steps``).

- ``train`` (default): BatchNorm as in any training run: batch statistics in the forward
  pass, running statistics updated with the module's momentum.
- ``frozen``: running statistics fixed (the modules run in eval mode: the forward pass
  normalises with the running mean/var), affine parameters (gamma, beta) still train.
- ``recalibrate``: before step 1, the running statistics are re-estimated on K batches
  of the new data (:func:`recalibrate`), then training goes on as ``train``.

Recalibration, from the definition: every BatchNorm's running mean and variance are
reset and set to the plain average over the K batches of each batch's mean and
unbiased variance (torch's cumulative average, ``momentum=None``); with R ranks, the
average over all K x R batches (the per-rank averages are all-reduced), so every rank
ends with the same statistics. Batches run through the plain backbone in fp32, no
gradient.
"""
from __future__ import annotations

from typing import Callable, List, Sequence

import torch
import torch.distributed as dist
from torch import nn


def bn_modules(model: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def set_bn_training(modules: Sequence[nn.Module], training: bool) -> None:
    """Host-side flag only (no device work): BN in train or eval mode."""
    for m in modules:
        if m.training != training:
            m.train(training)


@torch.no_grad()
def recalibrate(model: nn.Module, next_images: Callable[[], torch.Tensor], num_batches: int) -> int:
    """Re-estimate every BatchNorm's running statistics on ``num_batches`` batches (see the
    module docstring); returns the number of BatchNorm layers. Collective when a process
    group is initialised (every rank must call it with the same ``num_batches``)."""
    bns = bn_modules(model)
    if not bns or num_batches <= 0:
        return len(bns)
    momenta = [m.momentum for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    model.train()
    try:
        for _ in range(num_batches):
            model(next_images())
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        ws = dist.get_world_size()
        for m in bns:
            for buf in (m.running_mean, m.running_var):
                if buf is not None:  # track_running_stats (bn_modules keeps only those)
                    dist.all_reduce(buf)
                    buf.div_(ws)
    return len(bns)
