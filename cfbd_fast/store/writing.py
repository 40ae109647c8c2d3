"""Writing a new store from row-aligned arrays in batches (`EmbeddingStore.from_arrays`, the importers)."""
from __future__ import annotations

import os
from typing import Any, Iterator, Mapping

import numpy as np

from ..errors import InputError
from ..progress import progress_bar
from .record import DTYPE_CODES, dtype_name

_NORM_TOLERANCE = 1e-2  # |norm - 1| allowed for rows to count as L2-normalised (fp16 rounding is ~1e-3)


def write_batches(store_class, path: str | os.PathLike, arrays: Mapping[str, Any], batches: Iterator[tuple],
                  rows: int, dtype: Any = None, model: str | None = None, pretrained: str | None = None,
                  normalized: bool | None = None, progress: bool = False, description: str = "writing store"):
    """Create a store (`store_class`: EmbeddingStore) from row-aligned sources, appending `(start, stop,
    meta_table_or_None)` batches in order.

    Only one batch of each matrix is in memory at a time. Returns the finished store opened read-only.
    """
    first = next(iter(arrays.values()))
    for name, array in arrays.items():
        if np.ndim(array) != 2:
            raise InputError(f"{name} must be a 2-D array (rows, dim), got shape {np.shape(array)}")
        if array.shape[0] != rows or array.shape[1] != first.shape[1]:
            raise InputError(f"all matrices need the same shape: {name} is {array.shape}, expected ({rows}, "
                             f"{first.shape[1]})")
    if dtype is None:
        dtype = dtype_name(first.dtype) if np.dtype(first.dtype).name in DTYPE_CODES else "float32"
    check_norms = normalized is None
    all_unit = True
    store = store_class.create(path, dim=int(first.shape[1]), dtype=dtype, model=model, pretrained=pretrained,
                                  normalized=bool(normalized), matrices=tuple(arrays))
    with store, progress_bar(description, total=rows, enabled=progress) as bar:
        for start, stop, table in batches:
            batch = {name: np.asarray(array[start:stop]) for name, array in arrays.items()}
            if check_norms and all_unit:
                all_unit = all(_rows_have_unit_norm(b) for b in batch.values())
            store.append(meta=table, **batch)
            bar.advance(stop - start)
        if len(store) != rows:
            raise InputError(f"the sources yielded {len(store)} rows, expected {rows}")
        if check_norms and all_unit and rows > 0:
            store._set_record_fields(normalized=True)
    return store_class.open(path)


def _rows_have_unit_norm(batch: np.ndarray, block_rows: int = 8192) -> bool:
    for start in range(0, len(batch), block_rows):
        norms = np.linalg.norm(batch[start:start + block_rows].astype(np.float32), axis=1)
        if not np.all(np.abs(norms - 1.0) <= _NORM_TOLERANCE):
            return False
    return True
