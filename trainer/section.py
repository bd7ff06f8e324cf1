"""What every configuration section shares: the error, and the range / choice checks.

Each component owns its section (a dataclass beside the component, importable without
torch) and checks its own fields in ``__post_init__`` with :func:`need` and
:func:`one_of`; ``trainer.config`` composes the sections and loads YAML. The sections
of the orchestration (run, checkpoint, logging, validation) live here too: their
components import torch, a configuration must not.
"""
from __future__ import annotations

import math
import signal
from dataclasses import dataclass, field
from typing import Any, Iterable, List, Optional


class ConfigError(ValueError):
    """A config file or override is invalid (unknown key, wrong type, bad value)."""


def need(key: str, value: Any, ok: bool, what: str) -> None:
    """Raise ``config key '<key>' must be <what>, got <value>`` unless ``ok`` (None passes)."""
    if value is not None and not ok:
        raise ConfigError(f"config key '{key}' must be {what}, got {value!r}")


def one_of(key: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"config key '{key}': {value!r} is not one of {choices}")


def finite(x: Any) -> bool:
    return x is None or math.isfinite(x)


def at_least_one(prefix: str, obj: Any, names: Iterable[str]) -> None:
    for n in names:
        v = getattr(obj, n)
        need(prefix + n, v, v is None or v >= 1, ">= 1")


def non_negative_count(prefix: str, obj: Any, names: Iterable[str]) -> None:
    for n in names:
        v = getattr(obj, n)
        need(prefix + n, v, v >= 0, ">= 0 (0: never/off)")


#: run.nan_policy choices
NAN_POLICIES = ("stop", "skip")


@dataclass
class RunConfig:
    output: str = "work_dirs/run"
    seed: int = 2048
    num_epochs: int = 20
    max_steps: Optional[int] = None    # optimizer steps; overrides num_epochs
    nan_policy: str = "stop"           # stop | skip (both engines)
    max_skips: int = 10                # nan_policy=skip: give up after this many in a row
    # signals that stop the run with a checkpoint at the current step (trainer.runtime.preemption);
    # [] disables: the signal then acts as the default (the process ends at once)
    preempt_signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])

    def __post_init__(self) -> None:
        one_of("run.nan_policy", self.nan_policy, NAN_POLICIES)
        at_least_one("run.", self, ("num_epochs", "max_steps"))
        non_negative_count("run.", self, ("max_skips",))
        need("run.output", self.output, self.output.strip() != "",
             "a folder (empty: an unset shell variable would put the run into the current directory)")
        need("run.seed", self.seed, 0 <= self.seed < 2**31, "an integer in [0, 2**31)")
        for name in self.preempt_signals:
            sig = getattr(signal, name, None) if name.startswith("SIG") and not name.startswith("SIG_") else None
            if not isinstance(sig, signal.Signals) or sig in (signal.SIGKILL, signal.SIGSTOP):
                raise ConfigError(f"config key 'run.preempt_signals': {name!r} is not a signal that can be caught "
                                  "(e.g. SIGTERM, SIGUSR1, SIGUSR2, SIGINT)")


@dataclass
class CheckpointConfig:
    save_every: int = 2000             # optimizer steps; 0: only at the end
    keep_last: int = 3
    resume: str = "auto"               # auto | none (start over, old files moved aside) | path
    allow_config_change: bool = False  # resume although model/loss/data/optim keys changed

    def __post_init__(self) -> None:
        at_least_one("checkpoint.", self, ("keep_last",))
        non_negative_count("checkpoint.", self, ("save_every",))


@dataclass
class LoggingConfig:
    log_every: int = 50
    hist_every: int = 500              # negative-similarity histograms; 0: never
    image_grid: bool = True            # TensorBoard grid of the first batch
    progress_bar: Optional[bool] = None  # None: when stdout is a terminal

    def __post_init__(self) -> None:
        at_least_one("logging.", self, ("log_every",))
        non_negative_count("logging.", self, ("hist_every",))


@dataclass
class ValidationConfig:
    targets: List[str] = field(default_factory=list)  # .bin sets, e.g. [lfw, cfp_fp, agedb_30]
    val_dir: str = ""                  # folder of <target>.bin; default: data.train_dir
    every: int = 2000                  # optimizer steps; 0: only at the end
    at_start: bool = True              # accuracy of the untrained/resumed model first

    def __post_init__(self) -> None:
        non_negative_count("validation.", self, ("every",))
