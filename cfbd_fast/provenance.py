"""Where a result came from: library versions, the device, and digests of inputs. Used by scan summaries and `env`."""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

from ._version import __version__

# the name a summary records -> the distribution whose installed metadata gives its version
LIBRARIES = {"numpy": "numpy", "torch": "torch", "triton": "triton", "numba": "numba", "sklearn": "scikit-learn",
             "pyarrow": "pyarrow", "open_clip": "open_clip_torch"}


def versions() -> dict:
    """Versions of Python, cfbd-fast and the libraries it computes with (None for one that is not installed).

    Read from the installed packages' metadata: recording a version imports nothing (open_clip with torchvision and
    scikit-learn alone take seconds to import, longer than a small scan).
    """
    from importlib.metadata import PackageNotFoundError, version

    out = {"cfbd-fast": __version__, "python": platform.python_version(), "os": platform.platform()}
    for name, distribution in LIBRARIES.items():
        try:
            out[name] = version(distribution)
        except PackageNotFoundError:
            out[name] = None
    return out


def device_name(device: str = "cpu") -> str:
    """A human name of a torch device: the GPU's model, or the CPU with its core count."""
    if str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.device(device))
        return "no CUDA device"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu ({platform.processor() or platform.machine()}, {cores} cores)"


def text_digest(value) -> str:
    """A short digest of a JSON-able value (a config)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """A short sha256 digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
