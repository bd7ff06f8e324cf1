"""MobileFaceNet as in insightface ``arcface_torch`` (``mbf``), same parameter names."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import nn

_Pair = Tuple[int, int]


class ConvBlock(nn.Module):
    """conv (no bias) + BN + PReLU, held in ``self.layers`` like arcface_torch."""

    def __init__(self, in_c: int, out_c: int, kernel: _Pair = (1, 1), stride: _Pair = (1, 1),
                 padding: _Pair = (0, 0), groups: int = 1) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, groups=groups, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(num_features=out_c),
            nn.PReLU(num_parameters=out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LinearBlock(nn.Module):
    """conv (no bias) + BN, no activation."""

    def __init__(self, in_c: int, out_c: int, kernel: _Pair = (1, 1), stride: _Pair = (1, 1),
                 padding: _Pair = (0, 0), groups: int = 1) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(num_features=out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand, depthwise kxk, 1x1 project (+ residual)."""

    def __init__(self, in_c: int, out_c: int, residual: bool = False, kernel: _Pair = (3, 3),
                 stride: _Pair = (2, 2), padding: _Pair = (1, 1), groups: int = 1) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, out_c=groups, kernel=(1, 1), padding=(0, 0), stride=(1, 1)),
            ConvBlock(groups, groups, groups=groups, kernel=kernel, padding=padding, stride=stride),
            LinearBlock(groups, out_c, kernel=(1, 1), padding=(0, 0), stride=(1, 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layers(x)
        return x + y if self.residual else y


class Residual(nn.Module):
    def __init__(self, c: int, num_block: int, groups: int, kernel: _Pair = (3, 3),
                 stride: _Pair = (1, 1), padding: _Pair = (1, 1)) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *[DepthWise(c, c, True, kernel, stride, padding, groups) for _ in range(num_block)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv 7x7 -> linear -> BN1d."""

    def __init__(self, embedding_size: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(512, 512, groups=512, kernel=(7, 7), stride=(1, 1), padding=(0, 0)),
            nn.Flatten(),
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    def __init__(self, num_features: int = 512,
                 blocks: Sequence[int] = (1, 4, 6, 2), scale: int = 2) -> None:
        super().__init__()
        s = scale
        self.layers = nn.ModuleList()
        self.layers.append(ConvBlock(3, 64 * s, kernel=(3, 3), stride=(2, 2), padding=(1, 1)))
        if blocks[0] == 1:
            self.layers.append(ConvBlock(64 * s, 64 * s, kernel=(3, 3), stride=(1, 1), padding=(1, 1), groups=64))
        else:
            self.layers.append(Residual(64 * s, num_block=blocks[0], groups=128))
        self.layers.extend([
            DepthWise(64 * s, 64 * s, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=128),
            Residual(64 * s, num_block=blocks[1], groups=128),
            DepthWise(64 * s, 128 * s, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=256),
            Residual(128 * s, num_block=blocks[2], groups=256),
            DepthWise(128 * s, 128 * s, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=512),
            Residual(128 * s, num_block=blocks[3], groups=256),
        ])
        self.conv_sep = ConvBlock(128 * s, 512, kernel=(1, 1), stride=(1, 1), padding=(0, 0))
        self.features = GDC(num_features)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # trunk under the trainer's precision; the embedding layers in the parameters' dtype
        for f in self.layers:
            x = f(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = self.conv_sep(x.to(self.features_dtype()))
            return self.features(x)

    def features_dtype(self) -> torch.dtype:
        return next(self.conv_sep.parameters()).dtype


def mobilefacenet(num_features: int = 512, large: bool = False) -> MobileFaceNet:
    """``mbf`` (blocks 1,4,6,2 scale 2) or ``mbf_large`` (2,8,12,4 scale 4)."""
    if large:
        return MobileFaceNet(num_features, (2, 8, 12, 4), scale=4)
    return MobileFaceNet(num_features, (1, 4, 6, 2), scale=2)
