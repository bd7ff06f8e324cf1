"""Preemption: a signal stops the run with a checkpoint at the current step.

SLURM (``--signal``, and SIGTERM at the time limit or on preemption) and Kubernetes
(SIGTERM, then SIGKILL after ``terminationGracePeriodSeconds``) warn a job before
killing it. On a signal of ``run.preempt_signals`` (default SIGTERM, SIGUSR1) the
handler only sets a flag; every rank finishes its current optimizer step, the ranks
agree on the flag (one all-reduce MAX of one int per step, host-side over gloo, no
device sync: the price of never leaving a rank behind in a collective), save a checkpoint at that step together
(atomic, marker last) and exit with :data:`exit_code` = 128 + the signal number
(143 for SIGTERM, 138 for SIGUSR1: "ended by that signal", which Kubeflow's
``restartPolicy: ExitCode`` treats as retryable). ``resume: auto`` continues from it.

A second signal while the run is saving ends the process at once (same exit code)
and leaves the previous checkpoint intact (the unfinished one has no marker). A
repeat within :data:`DUPLICATE_WINDOW_S` seconds of the first is taken as the same
request delivered twice (e.g. SLURM signals every process of the step while
torchrun forwards the same signal) and ignored.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch
import torch.distributed as dist

log = logging.getLogger("trainer")

DUPLICATE_WINDOW_S = 2.0

#: what signal.signal returns and accepts: a function, SIG_DFL / SIG_IGN, or None
_Handler = Union[Callable[[int, Optional[FrameType]], Any], int, signal.Handlers, None]


def own_process_group(worker_id: int = 0) -> None:
    """``worker_init_fn`` of data-loading worker processes: move the worker into a process
    group of its own. torchrun signals each trainer's whole process group (``killpg``); a
    loader worker killed by that SIGTERM would make the trainer fail before it can save.
    Signals from the trainer itself (its shutdown of the workers) still reach the worker,
    and torch's watchdog ends a worker whose trainer died."""
    try:
        os.setpgid(0, 0)
    except OSError:  # pragma: no cover - not permitted (e.g. a session leader)
        pass


def exit_code(signum: int) -> int:
    """The documented exit code of a run stopped by ``signum``: 128 + signum."""
    return 128 + int(signum)


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint (``code``: the exit code)."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step, self.code = int(signum), int(step), exit_code(signum)
        super().__init__(f"stopped by {signal.Signals(signum).name} after saving a checkpoint at step {step} "
                         f"(exit code {self.code}); resume with checkpoint.resume=auto")


class PreemptionHandler:
    """Installs the handlers (main thread); :meth:`agreed` is the per-step collective check."""

    def __init__(self, names: Sequence[str], device: Optional[torch.device] = None) -> None:
        self.signals = [signal.Signals[n] for n in names]
        self.signum = 0
        self.first_at = 0.0
        self.saving = False
        self._previous: Dict[int, _Handler] = {}
        self._flag = None
        self._group = None
        self._device = device

    def install(self) -> PreemptionHandler:
        if threading.current_thread() is not threading.main_thread():
            log.warning("the trainer runs outside the main thread: preemption signals are not handled")
            return self
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        now = time.monotonic()
        if not self.signum:
            self.signum, self.first_at = signum, now
            log.warning("received %s: finishing the current step, then saving a checkpoint and exiting",
                        signal.Signals(signum).name)
            return
        if now - self.first_at < DUPLICATE_WINDOW_S:
            return  # the same request, delivered twice
        if self.saving:
            # stop now: the checkpoint being written has no marker, the previous one is intact
            os.write(2, f"second {signal.Signals(signum).name} during the checkpoint save: exiting now\n".encode())
            os._exit(exit_code(self.signum))
        log.warning("received %s again: still finishing the step", signal.Signals(signum).name)

    @property
    def requested(self) -> bool:
        return bool(self.signum)

    def agreed(self) -> int:
        """Collective (every rank, every step): the signal number if ANY rank got one, else 0.
        A host-side all-reduce of one int over a gloo group (the default group when it is
        gloo; a gloo twin of an NCCL group, made at the first call): no device sync."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.signum
        if self._flag is None:
            self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
            self._flag = torch.zeros(1, dtype=torch.int32)
        view = self._flag.numpy()  # host memory: read and written without any torch op
        view[0] = self.signum
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group)
        got = int(view[0])
        if got and not self.signum:
            self.signum, self.first_at = got, time.monotonic()
        return got


__all__ = ["DUPLICATE_WINDOW_S", "own_process_group", "Preempted", "PreemptionHandler", "exit_code"]
