"""Skipped steps: the one place that counts them and applies the policies.

The engine decides on the device whether a step is applied (a non-finite loss or
gradient, or an fp16 overflow, leaves every weight as it was: no host sync). The
:class:`StepGuard` keeps each step's device values (loss, skip and overflow flags,
loss scale, the head's :meth:`~trainer.heads.protocol.Head.step_stats`) until the
loop flushes it at a logging, validation or checkpoint step: one host sync for all
of them, one history record per step, then the policies, in step order:

- an fp16 loss-scale overflow (finite loss, scaled gradients not finite): GradScaler's
  normal event (at the start, then about every ``engine.growth_interval`` steps),
  counted (:attr:`TrainState.overflow_steps`) and logged, never a stop by itself;
  :class:`LossScaleError` when the scale falls below ``engine.min_scale`` or after
  ``engine.max_overflows`` overflows in a row;
- a non-finite loss (or gradient, where no loss scaler explains it): ``run.nan_policy``;
  ``stop`` raises :class:`NonFiniteLossError` naming the step, ``skip`` allows
  ``run.max_skips`` in a row (counted in :attr:`TrainState.skipped_steps`).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional

import torch

from trainer.engine import LossScaleError, NonFiniteLossError, StepOutput
from trainer.state import TrainState

log = logging.getLogger("trainer")


class StepGuard:
    def __init__(self, state: TrainState, history: List[Dict[str, Any]], nan_policy: str, max_skips: int,
                 min_scale: float, max_overflows: int) -> None:
        self.state, self.history = state, history
        self.nan_policy, self.max_skips = nan_policy, max_skips
        self.min_scale, self.max_overflows = min_scale, max_overflows
        self.skips_in_a_row = 0
        self.overflows_in_a_row = 0
        self._pending: List[tuple] = []

    def push(self, step: int, out: StepOutput, extra: Mapping[str, torch.Tensor]) -> None:
        """Keep step ``step``'s device values (no host sync)."""
        self._pending.append((step, out, dict(extra)))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush(self) -> None:
        """Read the pending steps' values (one host sync) into the history; apply the policies."""
        if not self._pending:
            return
        nan = float("nan")
        rows, names = [], []
        for _, out, extra in self._pending:
            dev = out.loss.device
            vals = [out.loss, out.skipped, 0.0 if out.overflow is None else out.overflow,
                    nan if out.loss_scale is None else out.loss_scale, *extra.values()]
            rows.append(torch.stack([torch.as_tensor(v, device=dev).detach().double().reshape(()) for v in vals]))
            names.append(list(extra))
        flat = torch.cat(rows).cpu().tolist()  # the one sync
        pending, self._pending = self._pending, []
        overflowed: List[int] = []
        scale = nan
        at = 0
        for (step, out, _), keys in zip(pending, names):
            loss, skipped, overflow, scale = flat[at:at + 4]
            extra = flat[at + 4:at + 4 + len(keys)]
            at += 4 + len(keys)
            rec: Dict[str, Any] = {"step": step, "loss": loss}
            rec.update({k: v for k, v in zip(keys, extra) if v == v})  # NaN: no value this step
            if out.loss_scale is not None:
                rec["loss_scale"] = scale
            if skipped and overflow:
                rec["skipped"], rec["overflow"] = True, True
                overflowed.append(step)
                self._overflow(step, scale)
            elif skipped:
                rec["skipped"] = True
                self._non_finite(step, loss)
            else:
                self.skips_in_a_row = self.overflows_in_a_row = 0
            self.history.append(rec)  # after the policy: a step that stops the run is not recorded
        if overflowed:
            log.info("fp16 loss-scale overflow at step%s %s: skipped (GradScaler's normal event); scale now %g, "
                     "%d overflow steps in this run", "s" if len(overflowed) > 1 else "",
                     ", ".join(map(str, overflowed)), scale, self.state.overflow_steps)

    def _overflow(self, step: int, scale: float) -> None:
        self.state.overflow_steps += 1
        self.overflows_in_a_row += 1
        if scale < self.min_scale or self.overflows_in_a_row >= self.max_overflows:
            why = (
                f"the scale fell to {scale:g} < engine.min_scale={self.min_scale:g}"
                if scale < self.min_scale
                else f"{self.overflows_in_a_row} overflows in a row (engine.max_overflows={self.max_overflows}), "
                f"scale {scale:g}"
            )
            raise LossScaleError(
                f"fp16 loss scaling gave up at step {step}: {why}; the gradients are not finite at any scale "
                "(no step was applied since the last good one); check lr and data, or train with "
                "engine.precision=bf16 or fp32, or resume from the last checkpoint")

    def _non_finite(self, step: int, loss: float) -> None:
        self.state.skipped_steps += 1
        self.skips_in_a_row += 1
        if self.nan_policy == "stop":
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {step} (loss {loss}): stopping (run.nan_policy=stop; "
                "the step was not applied); check lr, data and precision, or resume from the last checkpoint")
        if self.skips_in_a_row > self.max_skips:
            raise NonFiniteLossError(f"non-finite loss at step {step}: {self.skips_in_a_row} steps skipped in a row "
                                     f"(run.max_skips={self.max_skips}); stopping")
        log.warning("non-finite loss or gradient at step %d: step skipped (run.nan_policy=skip)", step)

    def last_loss_scale(self) -> Optional[float]:
        """The loss scale of the last flushed step (None: no loss scaling)."""
        return self.history[-1].get("loss_scale") if self.history else None


__all__ = ["StepGuard"]
