"""cfbd-fast: coarse-to-fine backdoor detection (CFBD) for image-caption datasets, at CC3M scale.

Public API: EmbeddingStore, scan, ScanConfig, ScanResult, load_mapper, ops (consistency, seed_correlation,
invalid_rows), fit_gmm.
Heavy parts (torch, numba) load on first use, so `import cfbd_fast` stays fast.
"""
from importlib import import_module

from ._version import __version__
from .errors import CfbdError, InputError, MapperMismatchError, StoreFormatError

_LAZY = {
    "EmbeddingStore": ("store", "EmbeddingStore"),
    "scan": ("pipeline", "scan"),
    "ScanConfig": ("pipeline", "ScanConfig"),
    "ScanResult": ("pipeline", "ScanResult"),
    "load_mapper": ("mapper", "load_mapper"),
    "fit_gmm": ("gmm", "fit_gmm"),
    "ops": ("ops", None),
}

__all__ = ["__version__", "CfbdError", "InputError", "MapperMismatchError", "StoreFormatError", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'cfbd_fast' has no attribute {name!r}")
    module, attr = _LAZY[name]
    mod = import_module(f".{module}", __name__)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value
