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


class BusyError(CfbdError, RuntimeError):
    """Another process holds the writer lock of the same store or output folder."""


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

    A second writer raises `BusyError` at once: "<what> <path> is being written by process <pid>; wait for
    it or stop it". `path` need not exist yet when it is a file; a folder must exist (create it first).
    Yields the lock file's path. Re-entering in the same process for the same path is refused the same way.
    """
    lock = lock_path(path)
    label = f"{what} {path}".strip()
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except FileNotFoundError as exc:
        raise CfbdError(f"{path}: its folder does not exist; create it first") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise BusyError(f"{label} is being written by process {_holder(fd)}; "
                            f"wait for it or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield lock
        finally:
            os.ftruncate(fd, 0)  # the lock file stays (removing it would race a waiting writer); empty = free
    finally:
        os.close(fd)
