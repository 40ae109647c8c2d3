"""Thread counts for torch and numba, chosen from the cores this process may use and the machine's load.

Both libraries default to one thread per core and spin while waiting; with another busy process on the
machine that oversubscription has made a CPU stage 10-40x slower, so every command sets them deliberately.
"""
from __future__ import annotations

import os


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_threads() -> int:
    """The cores this process may use minus those other processes keep busy (1-minute load average)."""
    cores = available_cores()
    try:
        busy = os.getloadavg()[0]
    except OSError:  # not available on this platform
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def configure_threads(threads: int | None = None) -> int:
    """Set torch's and numba's thread counts (`threads`, or `default_threads()`); returns the count set."""
    import torch

    n = threads or default_threads()
    torch.set_num_threads(n)
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:  # numba is a dependency; tolerate its absence in a trimmed environment
        pass
    return n
