"""The scan's one reader: a store seen as chunks of arrays, row gathers by id, and the rows' metadata and labels.

Nothing else in the scan opens or reads a store; the stages receive the arrays this module hands out.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import InputError
from ..store import Chunk, EmbeddingStore

LABEL_KEY_COLUMNS = ("key", "image_path", "image", "url")
LABEL_COLUMNS = ("is_poisoned", "label", "is_backdoor")


class ChunkSource:
    """Reads one store for a scan: `chunks()` streams row ranges, `gather()` fetches rows by id."""

    def __init__(self, store: str | Path | EmbeddingStore):
        self.store = store if isinstance(store, EmbeddingStore) else EmbeddingStore.open(store)
        self.path = self.store.path
        self.rows = len(self.store)
        self.dim = self.store.dim
        if self.rows == 0:
            raise InputError(f"{self.path}: the store is empty (0 rows); add rows before scanning or training on it")
        self.meta = self.store.meta
        self.keys = self._keys()

    @property
    def identity(self) -> dict:
        """What the scan records of its input: path, fingerprint, size, dtype and embedding model."""
        info = self.store.info
        return {"path": str(self.path), "fingerprint": self.store.fingerprint, "rows": self.rows, "dim": self.dim,
                "dtype": str(self.store.dtype), "model": info.get("model"), "pretrained": info.get("pretrained")}

    @property
    def embedding_model(self) -> dict:
        """The embedding model's identity, as mappers record it."""
        info = self.store.info
        return {"model": info.get("model"), "pretrained": info.get("pretrained"),
                "normalized": info.get("normalized")}

    def valid_rows(self, chunk_rows: int = 65536) -> np.ndarray:
        """Row ids whose image and caption vectors are finite with a non-zero norm (one streaming pass)."""
        out = []
        for chunk in self.chunks(chunk_rows):
            ok = np.ones(len(chunk), dtype=bool)
            for a in (chunk.image, chunk.text):
                ok &= np.isfinite(a).all(axis=1) & (np.abs(a).sum(axis=1, dtype=np.float32) > 0)
            out.append(np.flatnonzero(ok) + chunk.start)
        return np.concatenate(out)

    def _keys(self):
        """Source keys as pyarrow strings; the row id where the store has none."""
        import pyarrow as pa

        if "key" in self.meta.column_names:
            keys = self.meta.column("key").combine_chunks()
            if keys.null_count == 0:
                return keys.cast(pa.string())
        return pa.array([str(i) for i in range(self.rows)], type=pa.string())

    def chunks(self, rows: int, matrices: tuple[str, ...] = ("image", "text")) -> Iterator[Chunk]:
        return self.store.iter_chunks(rows=rows, matrices=matrices)

    def gather(self, matrix: str, rows: np.ndarray) -> np.ndarray:
        """float32 rows of one matrix in the order asked (read in sorted order)."""
        rows = np.asarray(rows, dtype=np.int64)
        data = self.store.matrix(matrix)
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        out[order] = data[rows[order]]
        return out

    def sample_valid(self, size: int, seed: int, matrices: tuple[str, ...]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Up to `size` random rows (sorted) whose vectors are finite with a non-zero norm in every matrix."""
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(self.rows, size=min(size, self.rows), replace=False))
        arrays = [self.gather(m, rows) for m in matrices]
        ok = np.ones(len(rows), dtype=bool)
        for a in arrays:
            ok &= np.isfinite(a).all(axis=1) & (np.abs(a).sum(axis=1) > 0)
        return rows[ok], [a[ok] for a in arrays]

    def labels(self, labels_path: str | Path | None) -> np.ndarray | None:
        """Ground truth per row: from a labels file (key + is_poisoned/label) or the store's `is_poisoned`."""
        if labels_path is None:
            if "is_poisoned" not in self.meta.column_names:
                return None
            col = self.meta.column("is_poisoned")
            if col.null_count == len(col):
                return None
            return np.asarray(col.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
        return read_labels(labels_path, self.keys)


def read_labels(path: str | Path, keys) -> np.ndarray:
    """Row-aligned booleans from a parquet/CSV file with a key column and a 0/1 label column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: labels file not found; give a parquet or CSV file with key and label columns")
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            import pyarrow.csv as pacsv

            keys_as_text = {c: pa.string() for c in LABEL_KEY_COLUMNS}  # keep leading zeros of 9-digit keys
            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=keys_as_text))
    except Exception as exc:  # pyarrow raises several types for unreadable files
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: cannot read labels ({detail}); expected parquet or CSV") from exc
    label_col = next((c for c in LABEL_COLUMNS if c in table.column_names), None)
    key_col = next((c for c in LABEL_KEY_COLUMNS if c in table.column_names), None)
    if label_col is None or key_col is None:
        raise InputError(f"{path}: needs a key column (key/image_path/image/url) and a label column "
                         f"(is_poisoned/label/is_backdoor); has {', '.join(table.column_names)}")
    label_keys = table.column(key_col).cast(pa.string())
    idx = pc.index_in(keys, value_set=label_keys)
    values = np.asarray(table.column(label_col).cast(pa.int8()).fill_null(0).to_numpy(zero_copy_only=False)) != 0
    found = np.asarray(idx.is_valid().to_numpy(zero_copy_only=False))  # keys without a label count as clean
    return found & values[np.asarray(idx.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)]
