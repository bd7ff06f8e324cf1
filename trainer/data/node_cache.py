"""The node's data cache: a dataset's parsed index and scanned labels, shared by the
processes of a node, and the lock (:class:`ScanLock`) that lets one of them build it.

Where: ``$UNPG_DATA_CACHE`` (default ``<tmp>/unpg-data-cache``), one folder per
``.rec``/``.idx`` pair named by a hash of their path, inode, size and mtime (a changed
file gets a new folder, never a stale cache)::

    <rec stem>-<hash>/idx_keys.npy, idx_offsets.npy   the parsed .idx (int64, memory-mapped)
                      labels.npy                      the image labels (int64, memory-mapped)
                      index.lock, labels.lock         who builds them (ScanLock)

On a miss one process per node takes the lock and builds the file (written atomically);
the others wait for it and then read it. A crashed builder frees the lock (the kernel
drops a ``flock`` with its process): the waiters find no file and build it themselves.
A cache location that cannot be written is not an error: each process builds its own.
"""
from __future__ import annotations

import errno
import hashlib
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import numpy as np

from trainer.io.atomic import atomic_open

PathLike = Union[str, os.PathLike]
Tick = Optional[Callable[[], None]]


def cache_root() -> Path:
    """``$UNPG_DATA_CACHE``, default ``<tmp>/unpg-data-cache`` (every cache of the data package)."""
    return Path(os.environ.get("UNPG_DATA_CACHE", Path(tempfile.gettempdir()) / "unpg-data-cache"))


def cache_dir(rec_path: Path, idx_path: Path) -> Path:
    """The cache folder of a ``.rec``/``.idx`` pair: named by their path, inode, size and mtime."""
    st_r, st_i = rec_path.stat(), idx_path.stat()
    tag = (f"{rec_path.resolve()}|{st_r.st_ino}|{st_r.st_size}|{st_r.st_mtime_ns}|"
           f"{st_i.st_ino}|{st_i.st_size}|{st_i.st_mtime_ns}")
    digest = hashlib.sha1(tag.encode()).hexdigest()[:16]
    return cache_root() / f"{rec_path.stem}-{digest}"


def _index_from_cache(d: Path) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    try:
        keys = np.load(d / "idx_keys.npy", mmap_mode="r", allow_pickle=False)
        offs = np.load(d / "idx_offsets.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if keys.shape == offs.shape and keys.ndim == 1 and keys.dtype == offs.dtype == np.int64:
        return keys, offs
    return None


def load_index_cached(d: Path, idx_path: Path, lock_timeout: Optional[float]) -> Tuple[np.ndarray, np.ndarray]:
    """(keys, offsets) of ``idx_path`` from cache folder ``d`` (memory-mapped: the ranks of a node
    share the pages). On a miss one process per node parses and writes it (:class:`ScanLock`,
    ``index.lock``) while the others wait for it."""
    from trainer.data.recordio import read_index_arrays

    got = _index_from_cache(d)
    if got is not None:
        return got
    try:
        d.mkdir(parents=True, exist_ok=True)
        lock = ScanLock(d / "index.lock", str(idx_path), lock_timeout, task="index parse")
    except OSError:
        return read_index_arrays(idx_path)
    with lock:
        got = _index_from_cache(d)
        if got is not None:
            return got
        keys, offs = read_index_arrays(idx_path, tick=lock.progress)
        try:
            for name, arr in (("idx_keys.npy", keys), ("idx_offsets.npy", offs)):
                with atomic_open(d / name, "wb") as f:
                    np.save(f, arr)
        except OSError:
            pass
    return keys, offs


def load_labels(cache: Path, shape: Tuple[int, ...]) -> Optional[np.ndarray]:
    """The cached int64 labels of ``shape`` at ``cache`` (memory-mapped), or None (absent,
    unreadable or of another shape: scan again)."""
    if not cache.is_file():
        return None
    try:
        lab = np.load(cache, mmap_mode="r", allow_pickle=False)  # shared by the node's ranks
    except Exception:  # noqa: BLE001 - an unreadable cache is rebuilt (None: scan again)
        return None
    return lab if lab.shape == shape and lab.dtype == np.int64 else None


def save_labels(cache: Path, labels: np.ndarray) -> None:
    """Write ``labels`` atomically; a cache that cannot be written is skipped."""
    try:
        with atomic_open(cache, "wb") as f:
            np.save(f, labels)
    except OSError:
        pass


def cached_labels(cache: Path, what: str, shape: Tuple[int, ...], compute: Callable[[Tick], np.ndarray],
                  lock_timeout: Optional[float]) -> np.ndarray:
    """The labels at ``cache``, or ``compute(tick)`` by one process of the node (``labels.lock``)
    while the others wait and then read its file. ``compute`` raises for a bad dataset: nothing
    is cached then. ``tick`` marks the builder's progress (the waiters' timeout counts from it)."""
    lab = load_labels(cache, shape)
    if lab is not None:
        return lab
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        lock = ScanLock(cache.parent / "labels.lock", what, timeout=lock_timeout)
    except OSError:
        return compute(None)  # read-only cache location: scan without sharing
    with lock:
        lab = load_labels(cache, shape)  # written by the process we waited for
        if lab is None:
            lab = compute(lock.progress)
            save_labels(cache, lab)
    return lab


#: seconds a waiter for a node's scan/index lock accepts without progress by its holder
#: (``data.lock_timeout``); the holder touches the lock file at every piece it scans, so a
#: 42M-record scan on slow storage never comes near it, while a stopped holder fails the wait.
DEFAULT_LOCK_TIMEOUT = 300.0


class ScanLockTimeout(TimeoutError):
    """A node's scan/index lock stayed held without progress for ``lock_timeout`` seconds."""


def _process_state(pid: int) -> str:
    """What this host knows of process ``pid``: running, stopped, in I/O wait, not running."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "not running"
        except OSError:
            return "alive"
        return "alive"
    return {"T": "alive but stopped (SIGSTOP or a debugger)", "t": "alive but stopped by a debugger",
            "D": "alive, blocked in uninterruptible I/O (hung storage?)", "Z": "not running (a zombie)",
            "X": "not running"}.get(state, "alive and running")


class ScanLock:
    """An exclusive ``flock`` on ``path`` (context manager) so one process per node scans.

    The kernel drops the lock when its holder exits or is killed, so a crashed
    scanner never blocks the others: they then find no cache and scan
    themselves. The holder writes ``pid host time`` into the file and touches it
    (:meth:`progress`) as it works; a waiter names it on stderr. ``timeout``
    (seconds, None = no limit): a waiter gives up with :class:`ScanLockTimeout`
    when the holder has shown no progress (file mtime) for that long, naming the
    lock file, the holder (pid, host, since when, alive or stopped, last progress)
    and how to clear it. Where ``flock`` is unsupported (some network
    filesystems) it does nothing.
    """

    POLL_S = 0.2
    TOUCH_S = 1.0

    def __init__(self, path: PathLike, what: str, timeout: Optional[float] = None, task: str = "label scan"):
        self.path, self.what, self.timeout, self.task = Path(path), what, timeout, task
        self.fd: Optional[int] = None
        self.waited = False
        self._touched = 0.0

    def __enter__(self) -> ScanLock:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        t0 = time.time()
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        os.close(fd)  # ENOLCK etc.: no locking here, scan unshared
                        return self
                if not self.waited:
                    self.waited = True
                    print(f"{self.what}: waiting for the {self.task} by {self.holder()} ({self.path})",
                          file=sys.stderr, flush=True)
                if self.timeout is not None:
                    try:
                        last = os.fstat(fd).st_mtime
                    except OSError:
                        last = t0
                    if time.time() - max(t0, last) > self.timeout:
                        raise ScanLockTimeout(self._timeout_message())
                time.sleep(self.POLL_S)
        except BaseException:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {time.time():.0f}\n".encode(), 0)
        self.fd = fd
        self._touched = time.monotonic()
        return self

    def progress(self) -> None:
        """The holder is working: touch the lock file (at most once per ``TOUCH_S``)."""
        if self.fd is None or time.monotonic() - self._touched < self.TOUCH_S:
            return
        self._touched = time.monotonic()
        try:
            os.utime(self.fd)
        except OSError:
            pass

    def _read_holder(self) -> Optional[Tuple[int, str, float]]:
        try:
            pid, host, ts = self.path.read_text().split()
            return int(pid), host, float(ts)
        except (OSError, ValueError):
            return None

    def holder(self) -> str:
        got = self._read_holder()
        if got is None:
            return "another process"
        pid, host, ts = got
        return f"pid {pid} on {host} (since {max(0.0, time.time() - ts):.0f} s)"

    def _timeout_message(self) -> str:
        got = self._read_holder()
        try:
            idle = f"{max(0.0, time.time() - self.path.stat().st_mtime):.0f} s ago"
        except OSError:
            idle = "unknown"
        if got is None:
            who, state, clear = "another process", "unknown", f"delete {self.path}"
        else:
            pid, host, ts = got
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
            who = f"pid {pid} on {host} since {since} ({max(0.0, time.time() - ts):.0f} s)"
            state = _process_state(pid) if host == socket.gethostname() else "on another host: not checked"
            clear = (f"stop that process (kill {pid}{' on ' + host if host != socket.gethostname() else ''}; "
                     f"the lock goes with it) or delete {self.path}")
        return (f"{self.path}: the {self.task} lock of {self.what} is held by {who}, {state}; its last "
                f"progress was {idle}: gave up after {self.timeout:g} s without progress "
                f"(data.lock_timeout). To clear it, {clear}; raise data.lock_timeout if the storage is "
                "that slow")

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None
