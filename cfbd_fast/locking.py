"""One writer at a time: an exclusive `flock` on a lock file beside what is being written.

The operating system releases the lock when the holding process exits or is killed, so a lock left by a
crashed writer never needs clearing by hand; readers never take it.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import CfbdError

LOCK_NAME = ".lock"
_held: dict[str, list[int]] = {}  # lock file -> [descriptor, depth] of the locks this process holds


class BusyError(CfbdError, RuntimeError):
    """Another process holds the writer lock of the same store or output folder."""


def _forget_in_child() -> None:
    """A forked child (e.g. a data-loader worker) closes its copies of the lock descriptors, so the lock goes
    with the writer that took it, not with the last of its children."""
    for fd, _ in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of `path`: `<path>/.lock` for a folder, `<path>.lock` beside anything else."""
    path = Path(path)
    return path / LOCK_NAME if path.is_dir() else path.with_name(path.name + ".lock")


def _holder(fd: int) -> str:
    """The pid the current holder wrote into the lock file (it writes it just after locking: wait briefly)."""
    for _ in range(50):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return text
        time.sleep(0.01)
    return "unknown"


@contextlib.contextmanager
def writer_lock(path: str | os.PathLike, what: str = "") -> Iterator[Path]:
    """Hold the exclusive writer lock of `path` (a folder or a file) for the body of the `with` block.

    A writer in another process raises `BusyError` at once: "<what> <path> is being written by process <pid>;
    wait for it or stop it". `path` need not exist yet when it is a file; a folder must exist (create it first).
    Within one process the lock is re-entrant (a command may hold it while the store it writes takes it too).
    Yields the lock file's path.
    """
    lock = lock_path(path)
    key = os.path.realpath(lock)
    if key not in _held:
        _held[key] = [_acquire(lock, path, f"{what} {path}".strip()), 0]
    entry = _held[key]
    entry[1] += 1
    try:
        yield lock
    finally:
        entry[1] -= 1
        if entry[1] == 0 and _held.get(key) is entry:  # the outermost holder; a forked child's entry is gone
            del _held[key]
            _release(entry[0])


def _release(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)  # the file stays (removing it would race the next writer); empty means free
    except OSError:
        pass
    os.close(fd)


def _acquire(lock: Path, path: str | os.PathLike, label: str) -> int:
    """An open descriptor of `lock` holding its exclusive flock, our pid written in; BusyError if taken."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:
        raise CfbdError(f"{path}: its folder does not exist; create it first") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _holder(fd)
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise BusyError(f"{label} is being written by process {holder}; wait for it or stop it") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd
