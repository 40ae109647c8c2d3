"""cfbd-fast: coarse-to-fine backdoor detection (CFBD) for image-caption datasets, at CC3M scale.

Public API: EmbeddingStore, scan, ops (consistency, seed_correlation, row_health), fit_gmm.
"""
from ._version import __version__
from .errors import CfbdError, InputError, StoreFormatError

__all__ = ["__version__", "CfbdError", "InputError", "StoreFormatError"]
