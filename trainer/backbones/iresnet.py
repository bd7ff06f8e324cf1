"""IResNet backbones with insightface ``arcface_torch`` compatible parameter names.

The module tree (conv1, bn1, prelu, layer1..4 of IBasicBlock, bn2, dropout, fc,
features) and every parameter/buffer shape match arcface_torch's
``backbones/iresnet.py``, so its released ``backbone.pth`` files load with
``load_state_dict(strict=True)``. tests/trainer/test_backbones.py pins the
key/shape table against a fixture written from the published architecture.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential

# Blocks per stage for each published depth.
IRESNET_LAYERS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN-conv-BN-PReLU-conv(stride)-BN plus identity/projection shortcut."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """insightface IResNet for 112x112 inputs -> ``num_features`` embedding."""

    fc_scale = 7 * 7

    def __init__(self, layers: Sequence[int], dropout: float = 0.0, num_features: int = 512,
                 grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes, eps=1e-05)
        self.prelu = nn.PReLU(self.inplanes)
        self.layer1 = self._make_layer(64, layers[0], stride=2)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.bn2 = nn.BatchNorm2d(512, eps=1e-05)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        self.fc = nn.Linear(512 * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)
        # As in arcface_torch: the embedding BN has a fixed unit scale.
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes, eps=1e-05),
            )
        layers: List[nn.Module] = [IBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _stage(self, layer: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and x.requires_grad:
            return checkpoint_sequential(layer, len(layer), x, use_reentrant=False)
        return layer(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The trunk runs under the trainer's precision (autocast); the fc/features head
        # in the parameters' own dtype, as arcface_torch keeps it out of fp16.
        x = self.prelu(self.bn1(self.conv1(x)))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = self._stage(layer, x)
        x = self.bn2(x)
        x = self.dropout(torch.flatten(x, 1))
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = self.fc(x.to(self.fc.weight.dtype))
            return self.features(x)


def iresnet(depth: int, **kwargs) -> IResNet:
    """IResNet of a published depth (18, 34, 50, 100, 200)."""
    if depth not in IRESNET_LAYERS:
        raise ValueError(f"iresnet depth {depth} not in {sorted(IRESNET_LAYERS)}")
    return IResNet(IRESNET_LAYERS[depth], **kwargs)
