"""What the trainer knows of a head: the :class:`Head` protocol.

The loop, the engine, the checkpointer and the monitor use a head only through
these members, so a new head (or margin) needs no edit outside ``trainer/heads``:

- ``forward(local_embeddings [B, D], local_labels [B]) -> loss``: the mean loss over
  the global batch, the same scalar on every rank (gradients as in docs/design.md).
- ``stats() -> {name: tensor}``: what the head wants monitored after the last
  forward, named by the head itself (the name is the TensorBoard tag, e.g.
  ``unpg/kept``, ``margin/batch_mean``); 0-dim tensors are scalars, 1-D tensors
  samples for a histogram. Device tensors, detached: reading them is the caller's
  host sync, at logging steps only.
- ``step_stats() -> {name: 0-dim tensor}``: the few values recorded for EVERY step
  in the run's history (``summary.json``), e.g. UNPG's ``kept_fraction`` and an
  adaptive margin's running statistics; snapshots (a later step does not change
  them), so the loop can keep several steps' worth on the device and read them in
  one sync. NaN means "no value this step" (the history leaves it out).
- ``check_inputs()``: raise (on every rank alike) if a step since the last call had
  bad input the forward could only record on the device; one host sync.
- state: ``state_dict()`` / ``load_state_dict(state)`` of this rank's shard. The
  head holds classes ``class_range = (start, stop)`` of ``num_classes``; every
  tensor of the state whose first dimension has ``stop - start`` rows is
  row-aligned with the classes, which is how a checkpoint re-slices the state for
  another world size (:mod:`trainer.checkpoint`); anything else (a margin's
  running state) is the same on every rank.

:class:`trainer.heads.PartialFC` implements it for every margin and for UNPG.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Protocol, Tuple, runtime_checkable

import torch


@runtime_checkable
class Head(Protocol):
    class_range: Tuple[int, int]
    num_classes: int

    def __call__(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor: ...

    def stats(self) -> Dict[str, torch.Tensor]: ...

    def step_stats(self) -> Dict[str, torch.Tensor]: ...

    def check_inputs(self) -> None: ...

    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Any: ...


__all__ = ["Head"]
