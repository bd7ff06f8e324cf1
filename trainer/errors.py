"""Expected errors: one line on stderr, a documented exit code, the traceback in a log file.

An expected error is one the user can act on (a bad config, dataset file or checkpoint, a
run folder in use, a non-finite loss, a lock held by a stuck process): the command prints
``error: <the message on one line>`` on stderr and exits with the error's code; the
traceback goes to ``<output>/logs/error-rank<R>.log`` when the run folder is this job's
(never into a folder another job holds), or to stderr with ``--debug``. Anything else is a
bug and keeps Python's traceback (exit 1).

Exit codes (``trainer.train``; ``unpg-launch`` passes them through): 2 config,
3 non-finite loss, 4 run folder refused, 5 data (a dataset file missing or bad, a node's
scan/index lock held without progress), 128+N stopped by signal N after a checkpoint.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

EXIT_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_RUN_FOLDER = 4
EXIT_DATA = 5


def exit_code(exc: BaseException) -> Optional[int]:
    """The documented code of an expected error; None for anything else (a bug)."""
    from trainer.checkpointer import ResumeError
    from trainer.data.node_cache import ScanLockTimeout
    from trainer.data.recordio import RecordIOError
    from trainer.engine import NonFiniteLossError
    from trainer.runtime.run_lock import RunLockedError
    from trainer.section import ConfigError

    if isinstance(exc, ConfigError):
        return EXIT_CONFIG
    if isinstance(exc, NonFiniteLossError):
        return EXIT_NONFINITE
    if isinstance(exc, (RunLockedError, ResumeError)):
        return EXIT_RUN_FOLDER
    if isinstance(exc, (RecordIOError, ScanLockTimeout, FileNotFoundError)):
        return EXIT_DATA
    return None


def one_line(exc: BaseException) -> str:
    """The message on one line (multi-line details joined with '; ')."""
    text = str(exc).strip() or type(exc).__name__
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def report(exc: BaseException, code: int, log_dir: Optional[Path] = None, debug: bool = False) -> int:
    """Print ``error: <message>`` on stderr; the traceback to ``log_dir`` (or stderr with
    ``debug``); returns ``code``."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    where = ""
    if debug:
        sys.stderr.write(tb)
    elif log_dir is not None:
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            path = log_dir / f"error-rank{int(os.environ.get('RANK', '0'))}.log"
            with open(path, "a") as f:
                f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} exit {code}\n{tb}")
            where = f" (traceback: {path})"
        except OSError:
            pass
    print(f"error: {one_line(exc)}{where}", file=sys.stderr, flush=True)
    return code
