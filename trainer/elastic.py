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
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from trainer.data.plan import Segment, coerce_segments
from trainer.section import ConfigError

log = logging.getLogger("trainer")


class GlobalBatchError(ConfigError):
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


def saved_global_batch(state: Dict[str, Any]) -> Optional[int]:
    """Images per optimizer step of the run that wrote ``state`` (older checkpoints: from its config)."""
    g = state.get("global_batch")
    if g is not None:
        return int(g)
    cfg = state.get("config") or {}
    b, a = cfg.get("data", {}).get("batch_size"), cfg.get("optim", {}).get("grad_accum", 1)
    return None if b is None or "world_size" not in state else int(b) * int(state["world_size"]) * int(a)


def peek_global_batch(candidates) -> Tuple[Optional[int], str]:
    """(global batch, checkpoint) of the first candidate whose ``trainer.pt`` reads (memory-mapped:
    the tensors are not read), before the engine is built; (None, "") when none does."""
    import torch

    for c in candidates:
        try:
            state = torch.load(Path(c) / "trainer.pt", map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - resume reports unreadable checkpoints; try the next
            continue
        g = saved_global_batch(state) if isinstance(state, dict) else None
        if g is not None:
            return g, str(c)
    return None, ""


def grad_accum_for(cfg, world_size: int, candidates, agree: Optional[Callable[[str], list]] = None
                   ) -> Tuple[int, int]:
    """(optim.grad_accum to run with, global batch) at ``world_size``.

    A fresh run (or ``data.keep_global_batch: false``): the configured accumulation, global
    batch ``data.batch_size x world_size x optim.grad_accum``. A resume with
    ``keep_global_batch``: the checkpoint's global batch, accumulation derived
    (:func:`derive_grad_accum`). ``agree(text) -> [every rank's text]`` (default: the process
    group's all-gather) makes the ranks use rank 0's reading (they could see different candidates).
    """
    b, accum = cfg.data.batch_size, cfg.optim.grad_accum
    if not cfg.data.keep_global_batch:
        return accum, b * world_size * accum
    g, where = peek_global_batch(candidates)
    if agree is None:
        from trainer.runtime.process_group import gather_strings as agree
    text, where = agree(f"{g}\t{where}")[0].split("\t", 1)  # rank 0's reading on every rank
    g = None if text == "None" else int(text)
    if g is None:
        return accum, b * world_size * accum
    if g % b:
        raise GlobalBatchError(
            f"data.keep_global_batch: the run's global batch {g} (checkpoint {where}) is not a multiple of "
            f"data.batch_size={b}; choose a per-rank batch that divides it, or set data.keep_global_batch=false")
    new = derive_grad_accum(b, world_size, ref_world=g // b, ref_accum=1, global_batch=g)
    if new != accum:
        log.info("data.keep_global_batch: optim.grad_accum=%d (configured %d) keeps the global batch %d of %s at "
                 "%d ranks x batch %d", new, accum, g, where, world_size, b)
    return new, g


def derive_grad_accum(batch_size: int, world_size: int, ref_world: int, ref_accum: int,
                      global_batch: Optional[int] = None) -> int:
    """``optim.grad_accum`` that keeps ``batch_size x ref_world x ref_accum`` images per optimizer step
    at ``world_size`` ranks; :class:`GlobalBatchError` naming the sizes when it does not divide."""
    total = ref_world * ref_accum
    if total % world_size:
        raise GlobalBatchError(
            f"data.keep_global_batch: the global batch {global_batch or batch_size * total} cannot be kept at "
            f"{world_size} ranks x data.batch_size={batch_size}: {total} micro-batches of {batch_size} per step "
            f"are not divisible by {world_size} ranks; run at a world size that divides {total}, change "
            "data.batch_size, or set data.keep_global_batch=false")
    return total // world_size


def check_resumed_global_batch(state: Dict[str, Any], global_batch: int, keep: bool, where: str) -> None:
    """The checkpoint actually loaded (resume may fall back to an older one) has the global
    batch that the accumulation was derived from."""
    g = saved_global_batch(state)
    if keep and g is not None and g != global_batch:
        raise GlobalBatchError(f"{where}: global batch {g}, but this run derived its accumulation for {global_batch} "
                               "(from a newer checkpoint that did not load); remove the unloadable checkpoint "
                               "and restart")


def check_world_size(num_classes: int, world_size: int, where: str) -> None:
    """Every rank holds at least one class of the Partial FC head (a scale-up past the class
    count would leave ranks with an empty shard)."""
    if world_size > num_classes:
        raise ConfigError(f"{where or 'the dataset'}: {num_classes} classes cannot be split over {world_size} ranks "
                          "(the classifier needs at least one class per rank); run with at most "
                          f"{num_classes} ranks")
