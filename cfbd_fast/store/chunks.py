"""Chunk: rows [start, stop) of a store's matrices, the unit in which a store is streamed."""
from __future__ import annotations

import numpy as np


class Chunk:
    """Rows [start, stop) of some matrices, one read-only numpy array per matrix: `chunk.image`, `chunk.text`."""

    __slots__ = ("start", "stop", "arrays")

    def __init__(self, start: int, stop: int, arrays: dict[str, np.ndarray]):
        self.start = start
        self.stop = stop
        self.arrays = arrays

    def __getattr__(self, name: str) -> np.ndarray:
        try:
            return self.arrays[name]
        except KeyError:
            raise AttributeError(f"chunk has no matrix {name!r}; it holds {', '.join(self.arrays)}") from None

    def __len__(self) -> int:
        return self.stop - self.start

    def __repr__(self) -> str:
        return f"Chunk(start={self.start}, stop={self.stop}, matrices={tuple(self.arrays)})"
