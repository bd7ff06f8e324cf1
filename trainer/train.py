"""Training entry point: ``unpg-train CONFIG [key=value ...]`` (= ``python -m trainer.train``),
one process, or under torchrun.

One process without torchrun; with torchrun every rank joins the process group
(NCCL on CUDA, gloo on CPU) and takes its device from LOCAL_RANK. The backbone
runs under DDP (default) or a DeepSpeed engine; the Partial FC shard always
stays outside with its own optimizer (docs/design.md). Nothing runs at import.
Exit codes: 0 done, 2 config error (also a resumed run whose configuration
changed), 3 non-finite loss, 4 run folder refused (in use by another job, or
checkpoints present but none loadable), 5 data error (a dataset file missing or
bad, a node's scan lock held without progress), 128+N stopped by signal N of
``run.preempt_signals`` after a checkpoint at the current step (143 for SIGTERM,
138 for SIGUSR1; ``trainer.runtime.preemption``). An expected error prints one line,
``error: <message>``, on stderr; its traceback goes to ``<output>/logs/`` (or to
stderr with ``--debug``; trainer.errors).
"""
from __future__ import annotations

import gc
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch.distributed as dist

from trainer.config import ConfigError, load_config
from trainer.errors import EXIT_CONFIG, exit_code, report
from trainer.loop import run
from trainer.runtime.preemption import Preempted
from trainer.runtime.run_lock import RunLockedError

log = logging.getLogger("trainer")


def report_exit_code(code: int) -> None:
    """Under ``unpg-launch`` (``$UNPG_EXIT_CODE_DIR`` set): write this worker's exit code
    where the launcher reads it (torchrun would turn any failure into 1)."""
    folder = os.environ.get("UNPG_EXIT_CODE_DIR")
    if not folder:
        return
    name = f"rank-{int(os.environ.get('RANK', '0'))}.r{int(os.environ.get('TORCHELASTIC_RESTART_COUNT', '0'))}"
    try:
        tmp = os.path.join(folder, f".{name}.{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(f"{int(code)}\n")
        os.replace(tmp, os.path.join(folder, name))
    except OSError:
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    code = _main(argv)
    report_exit_code(code)
    return code


def _main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(f"{__doc__}\nusage: unpg-train CONFIG.yaml [section.key=value ...] [--debug]")
        return 0 if argv else 2
    try:
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as e:
        return report(e, EXIT_CONFIG, debug=debug)
    try:
        run(cfg)
    except Preempted as e:
        log.warning("%s", e)
        return e.code
    except Exception as e:
        code = exit_code(e)
        if code is None:
            raise
        log.error("%s", e)
        # the traceback goes into the run folder, unless another job holds it
        log_dir = None if isinstance(e, RunLockedError) or not cfg.run.output else Path(cfg.run.output) / "logs"
        return report(e, code, log_dir, debug)
    finally:
        if dist.is_available() and dist.is_initialized():
            # A run that failed after its engine was built leaves the trainer in reference
            # cycles (DDP's hooks) that still hold the process group: collect them while the
            # group is alive. Left to interpreter exit, a gloo group torn down after its peers
            # have gone aborts the process ("terminate called without an active exception",
            # exit 134 instead of the documented code; seen 1 run in 6 on a failed resume).
            gc.collect()
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
