"""The one input rule of the models: uint8 RGB pixels -> float32 in [-1, 1].

.. math::  x' = (x - 127.5) / 127.5

insightface's backbones are trained and evaluated on this; training (a loader's NHWC
batch) and evaluation (a ``.bin`` set's NCHW images) both call :func:`to_model_input`, with
the layout of what they hold, so the two can never drift apart.
"""
from __future__ import annotations

import torch

#: the layouts a uint8 batch may come in: loaders give NHWC, ``.bin`` sets NCHW
LAYOUTS = ("NHWC", "NCHW")


def to_model_input(images: torch.Tensor, layout: str = "NHWC") -> torch.Tensor:
    """uint8 RGB ``[N,H,W,3]`` (``layout="NHWC"``) or ``[N,3,H,W]`` (``"NCHW"``) -> float32
    NCHW in [-1, 1]: the one cast + normalisation, done on the device the batch is on.
    From NHWC the result has channels_last strides (fast convolutions on GPUs). Float input
    (already normalised, e.g. a test's in-memory loader) is returned as it is."""
    if layout not in LAYOUTS:
        raise ValueError(f"to_model_input: layout must be one of {LAYOUTS}, got {layout!r}")
    if images.dtype != torch.uint8:
        return images
    if layout == "NHWC":
        images = images.permute(0, 3, 1, 2)
    return images.float().sub_(127.5).div_(127.5)
