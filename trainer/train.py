"""Training entry point: ``unpg-train CONFIG [key=value ...]`` (= ``python -m trainer.train``),
one process, or under torchrun.

One process without torchrun; with torchrun every rank joins the process group
(NCCL on CUDA, gloo on CPU) and takes its device from LOCAL_RANK. The backbone
runs under DDP (default) or a DeepSpeed engine; the Partial FC shard always
stays outside with its own optimizer (docs/design.md). Nothing runs at import.
Exit codes: 0 done, 2 config error (also a resumed run whose configuration
changed), 3 non-finite loss, 4 run folder refused (in use by another job, or
checkpoints present but none loadable), 128+N stopped by signal N of
``run.preempt_signals`` after a checkpoint at the current step (143 for SIGTERM,
138 for SIGUSR1; ``trainer.preemption``).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional, Sequence

import torch.distributed as dist

from trainer.checkpointer import ResumeError
from trainer.config import ConfigError, load_config
from trainer.engine import NonFiniteLossError
from trainer.loop import run
from trainer.ownership import RunLockedError
from trainer.preemption import Preempted

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
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ + "\nusage: unpg-train CONFIG.yaml [section.key=value ...]")
        return 0 if argv else 2
    try:
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        run(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (RunLockedError, ResumeError) as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 4
    except Preempted as e:
        log.warning("%s", e)
        return e.code
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
