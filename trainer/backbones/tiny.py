"""A tiny CNN for CPU-only runs (demo, tests, experiments on 2 cores).

~45 MFLOPs per 112x112 image forward (torch.utils.flop_counter, 2 FLOPs per
multiply-add; tests/trainer/test_backbones.py measures it), i.e. ~60x cheaper
than iresnet18. Same interface as the insightface backbones: images
[B,3,112,112] in [-1,1] -> embedding [B, num_features].
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential


def _cbp(cin: int, cout: int, stride: int, norm: bool) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=not norm),
        nn.BatchNorm2d(cout) if norm else nn.Identity(),
        nn.PReLU(cout),
    )


class TinyCNN(nn.Module):
    def __init__(self, num_features: int = 512, width: int = 16, dropout: float = 0.0,
                 norm: str = "batch", grad_checkpointing: bool = False) -> None:
        """``norm``: "batch" (default) or "none" (no batch-dependent layer: per-sample
        outputs, used by the DDP-vs-single-process equivalence test)."""
        super().__init__()
        if norm not in ("batch", "none"):
            raise ValueError(f"TinyCNN norm must be 'batch' or 'none', got {norm!r}")
        bn = norm == "batch"
        self.grad_checkpointing = grad_checkpointing
        w = width
        self.body = nn.Sequential(
            _cbp(3, w, 2, bn),            # 56x56
            _cbp(w, 2 * w, 2, bn),        # 28x28
            _cbp(2 * w, 4 * w, 2, bn),    # 14x14
            _cbp(4 * w, 4 * w, 1, bn),
            _cbp(4 * w, 8 * w, 2, bn),    # 7x7
        )
        self.bn2 = nn.BatchNorm2d(8 * w) if bn else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(8 * w * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features) if bn else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            x = checkpoint_sequential(self.body, len(self.body), x, use_reentrant=False)
        else:
            x = self.body(x)
        x = self.bn2(x)
        x = self.dropout(torch.flatten(x, 1))
        return self.features(self.fc(x))
