"""Elastic training: a job that resumes at another world size or per-rank batch keeps
its data order (each image once per epoch) and its optimisation (the global batch).

Data order (:mod:`trainer.data.plan`, *Segments*): a checkpoint records the epoch,
the micro-batches consumed in the current *segment* (``batch``) and the segments
of this epoch that ran before at another ``(world size, per-rank batch)``. A
resume at a different size closes the saved segment, ``(W, B, batch)``, and
starts a new one at batch 0: the loader serves the rest of the same epoch's
stream, split over the new ranks. A resume at the same size just continues.

Global batch (``data.keep_global_batch``, :func:`derive_grad_accum`): the
configured global batch is ``data.batch_size x reference world x optim.grad_accum``
where the reference world is the world size the run was started with (recorded
in every checkpoint); at another world size ``W`` the accumulation becomes
``reference world x grad_accum / W``, so one optimizer step still consumes the
same number of images and the step-counted schedule (lr, warm-up, checkpoint
and validation intervals) means the same.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

from trainer.data.plan import Segment, coerce_segments

log = logging.getLogger("trainer")


class GlobalBatchError(ValueError):
    """The configured global batch cannot be kept at this world size (one line, exit 2)."""


def saved_batch_size(state: Dict[str, Any]) -> Optional[int]:
    b = state.get("batch_size")
    if b is None:  # checkpoints before the key: the saved configuration's
        b = (state.get("config") or {}).get("data", {}).get("batch_size")
    return None if b is None else int(b)


def continue_epoch(state: Dict[str, Any], world_size: int, batch_size: int, where: str = "") -> Tuple[int, tuple]:
    """(batch, segments) to resume with from a checkpoint's trainer ``state``.

    Same world size and per-rank batch: the saved position. Otherwise, mid-epoch,
    the saved segment is closed (``(saved world, saved batch, batch)``) and the new
    one starts at batch 0; at an epoch boundary nothing is consumed yet.
    """
    batch = int(state.get("batch", 0))
    segments = coerce_segments(state.get("segments", ()))
    w0, b0 = int(state["world_size"]), saved_batch_size(state)
    if batch == 0 or (w0 == world_size and (b0 is None or b0 == batch_size)):
        return batch, segments
    if b0 is None:
        raise ValueError(f"{where}: the checkpoint does not record its per-rank batch size, so epoch "
                         f"{state.get('epoch')} cannot be resumed mid-way at {world_size} ranks x batch {batch_size}")
    segments = segments + (Segment(w0, b0, batch),)
    log.info("%s: epoch %s continues at %d ranks x batch %d after %d batches at %d ranks x batch %d "
             "(the images already used in this epoch are not served again)", where, state.get("epoch"),
             world_size, batch_size, batch, w0, b0)
    return 0, segments


def set_epoch(loader, epoch: int, batch: int, segments: tuple) -> None:
    """``loader.set_epoch`` with the epoch's earlier segments (only when there are some, so
    loaders without segment support keep working until a change happens; then a clear error)."""
    if not segments:
        loader.set_epoch(epoch, start_batch=batch)
        return
    try:
        loader.set_epoch(epoch, start_batch=batch, segments=segments)
    except TypeError as e:
        raise TypeError(f"{type(loader).__name__} cannot continue epoch {epoch} after a change of world size or "
                        f"per-rank batch (set_epoch has no 'segments'): {e}") from e


def derive_grad_accum(batch_size: int, world_size: int, ref_world: int, ref_accum: int) -> int:
    """``optim.grad_accum`` that keeps ``batch_size x ref_world x ref_accum`` images per optimizer step
    at ``world_size`` ranks; :class:`GlobalBatchError` naming the sizes when it does not divide."""
    total = ref_world * ref_accum
    if total % world_size:
        raise GlobalBatchError(
            f"data.keep_global_batch: the global batch {batch_size * total} (data.batch_size={batch_size} x "
            f"{ref_world} ranks x optim.grad_accum={ref_accum}) cannot be kept at {world_size} ranks: "
            f"{ref_world} x {ref_accum} = {total} micro-batches per step is not divisible by {world_size}; "
            "run at a world size that divides it, or set data.keep_global_batch=false")
    return total // world_size
