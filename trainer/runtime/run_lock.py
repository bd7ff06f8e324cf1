"""One writer per run folder, and no worker outliving its launcher.

- :class:`RunLock`: an exclusive lock on ``<output>/.lock``, taken by rank 0 before
  anything in the folder is written and held for the life of the process. The file
  records the holder (host, pid, time) for the error message of a second job. The kernel
  drops the lock when the holder dies (also ``kill -9``), so a torchrun restart or a
  requeue of the same job gets it again. It is a POSIX record lock (``fcntl.lockf``),
  not ``flock``: a ``flock`` is shared with forked children (data-loader workers), which
  would keep a dead trainer's folder locked until they exit; a record lock belongs to
  the process alone, and NFS (lockd) honours it across hosts. Limits: some file systems
  (certain FUSE mounts) do not implement locks; there it protects nothing, and one
  process must not open ``.lock`` elsewhere (closing any descriptor of the file drops a
  record lock).
- :func:`die_with_parent`: under torchrun, ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (Linux)
  so a worker is killed when its agent dies, instead of training on beside a restarted
  job (torchrun starts each worker in its own session: signals to the agent's process
  group do not reach it).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger("trainer")

LOCK_FILE = ".lock"
_PR_SET_PDEATHSIG = 1


class RunLockedError(RuntimeError):
    """Another process holds the run folder."""


class RunLock:
    """``RunLock(folder).acquire()``; released by :meth:`release` or by the process ending."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.fd: Optional[int] = None

    def acquire(self, wait_s: float = 0.0) -> RunLock:
        """Take the lock; ``wait_s`` > 0 retries that long (a restart of the same job: the
        previous holder may take a moment to be reaped)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    os.close(fd)
                    raise
                if time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                try:
                    holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown holder"
                finally:
                    os.close(fd)
                raise RunLockedError(
                    f"run folder {self.folder} is in use by another job ({holder}; lock file {self.path}). "
                    "Two jobs writing one run would overwrite and prune each other's checkpoints: wait for "
                    "it to end, stop it, or choose another run.output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC\n".encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            fcntl.lockf(fd, fcntl.LOCK_UN)
            os.close(fd)


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "TORCHELASTIC_RESTART_COUNT" in os.environ


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux only).
    Returns whether it was set. Exits at once if the parent is already gone."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): this worker will not die with its agent",
                        ctypes.get_errno())
            return False
    except (OSError, AttributeError) as e:
        log.warning("prctl unavailable (%s): this worker will not die with its agent", e)
        return False
    # the agent died before the request took effect (the parent changed); a parent that IS
    # pid 1 is fine (torchrun as a container's entrypoint)
    if os.getppid() != parent:
        os._exit(1)
    return True


__all__ = ["LOCK_FILE", "RunLock", "RunLockedError", "die_with_parent", "under_torchrun"]
