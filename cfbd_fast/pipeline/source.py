"""The scan's one reader: the rows one process scans (a whole store, shard stores one after the other, or one
rank's share of either) as chunks of arrays, row gathers, and the rows' keys, metadata and labels.

Global row ids number the rows of the stores one after the other in the order given (the rows of one store as
they are), so every rank names a row as one process over the same stores does. A process's rows are segments
(row ranges of stores) in local positions 0..rows; one process alone holds them all, and its local positions are
the global ids. Nothing else in the scan opens or reads a store; the stages receive the arrays handed out here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import InputError
from ..store import Chunk, EmbeddingStore

LABEL_KEY_COLUMNS = ("key", "image_path", "image", "url")
LABEL_COLUMNS = ("is_poisoned", "label", "is_backdoor")


@dataclass
class Segment:
    """Rows [start, stop) of one store, global ids from `global_start`, local positions from `local_start`."""
    store: EmbeddingStore
    start: int
    stop: int
    global_start: int
    local_start: int

    def __len__(self) -> int:
        return self.stop - self.start


def open_stores(stores) -> list[EmbeddingStore]:
    """The stores of a scan (paths or open stores), checked to hold the same kind of vectors."""
    stores = list(stores) if isinstance(stores, (list, tuple)) else [stores]
    if not stores:
        raise InputError("no store to scan: give a store, or --shards matching at least one store")
    opened = [s if isinstance(s, EmbeddingStore) else EmbeddingStore.open(s) for s in stores]
    first = opened[0]
    for st in opened[1:]:
        if (st.dim, st.dtype, st.model) != (first.dim, first.dtype, first.model):
            raise InputError(f"{st.path}: dim {st.dim}, dtype {st.dtype}, model {st.model} differ from "
                             f"{first.path} ({first.dim}, {first.dtype}, {first.model}): shards must match")
    return opened


class ChunkSource:
    """The rows one process scans: `chunks()` streams them, `gather()` fetches them by local position.

    `stores`: one store (a path or an EmbeddingStore) or a list of shard stores. Rank `rank` of `world` holds an
    even row range of one store, or every world-th shard store (round-robin); a world of one holds every row.
    """

    def __init__(self, stores, rank: int = 0, world: int = 1):
        opened = open_stores(stores)
        sizes = [len(st) for st in opened]
        self.stores = opened
        self.store = opened[0]  # what the passes ask of "the store": dtype and matrix kinds (every shard matches)
        self.total_rows = int(sum(sizes))
        if self.total_rows == 0:
            raise InputError(f"{self.store.path}: the store is empty (0 rows); add rows before scanning or training "
                             "on it")
        self.segments = _segments(opened, sizes, rank, world)
        self.rows = sum(len(s) for s in self.segments)
        if self.rows == 0:
            raise InputError(f"rank {rank} of {world} has no rows to scan: run fewer ranks")
        self.dim = self.store.dim
        self.path = self.store.path if len(opened) == 1 else Path(f"{self.store.path} (+{len(opened) - 1} shards)")
        self._meta = None
        self._keys = None

    # -- identity ------------------------------------------------------------------------------------------
    @property
    def identity(self) -> dict:
        """What the scan records of its input: path, fingerprint, size, dtype, embedding model (and shards)."""
        first = self.store
        info = first.info
        ident = {"path": str(first.path), "fingerprint": first.fingerprint, "rows": self.total_rows, "dim": self.dim,
                 "dtype": str(first.dtype), "model": info.get("model"), "pretrained": info.get("pretrained")}
        ident["complete"] = not self.unfinished()
        if len(self.stores) > 1:
            ident["shards"] = [{"path": str(st.path), "fingerprint": st.fingerprint, "rows": len(st),
                                "complete": st.completion[0]} for st in self.stores]
        return ident

    def unfinished(self) -> list[str]:
        """A line for each store whose embedding was stopped before the end of its input (none when all are
        whole)."""
        lines = []
        for st in self.stores:
            finished, done, total = st.completion
            if finished:
                continue
            at = "" if done is None else f" at input {done:,}" if total is None else f" at input {done:,} of {total:,}"
            lines.append(f"{st.path}: incomplete: its embedding stopped{at} ({len(st):,} rows embedded)")
        return lines

    @property
    def embedding_model(self) -> dict:
        """The embedding model's identity, as mappers record it."""
        info = self.store.info
        return {"model": info.get("model"), "pretrained": info.get("pretrained"),
                "normalized": info.get("normalized")}

    @property
    def record(self) -> dict:
        return self.store.record

    def close(self) -> None:
        for st in self.stores:
            st.close()

    # -- what the passes read ----------------------------------------------------------------------------
    def chunks(self, rows: int, matrices: tuple[str, ...] = ("image", "text")) -> Iterator[Chunk]:
        """Chunks whose start/stop are local positions."""
        for seg in self.segments:
            for chunk in seg.store.iter_chunks(rows=rows, matrices=matrices, start=seg.start, stop=seg.stop):
                shift = seg.local_start - seg.start
                yield chunk if shift == 0 else Chunk(chunk.start + shift, chunk.stop + shift,
                                                     {name: getattr(chunk, name) for name in matrices})

    def valid_rows(self, chunk_rows: int = 65536) -> np.ndarray:
        """Local positions whose image and caption vectors are finite with a non-zero norm (one streaming pass)."""
        out = []
        for chunk in self.chunks(chunk_rows):
            ok = np.ones(len(chunk), dtype=bool)
            for a in (chunk.image, chunk.text):
                ok &= np.isfinite(a).all(axis=1) & (np.abs(a).sum(axis=1, dtype=np.float32) > 0)
            out.append(np.flatnonzero(ok) + chunk.start)
        return np.concatenate(out)

    def gather(self, matrix: str, local: np.ndarray) -> np.ndarray:
        """float32 rows of one matrix at local positions, in the order asked (each store read in sorted order)."""
        local = np.asarray(local, dtype=np.int64)
        out = np.empty((len(local), self.dim), dtype=np.float32)
        for s in self.segments:
            inside = (local >= s.local_start) & (local < s.local_start + len(s))
            if inside.any():
                rows = local[inside] - s.local_start + s.start
                order = np.argsort(rows, kind="stable")
                block = np.empty((len(rows), self.dim), dtype=np.float32)
                block[order] = s.store.matrix(matrix)[rows[order]]
                out[inside] = block
        return out

    # -- ids ---------------------------------------------------------------------------------------------
    def global_ids(self, local: np.ndarray) -> np.ndarray:
        local = np.asarray(local, dtype=np.int64)
        starts = np.array([s.local_start for s in self.segments], dtype=np.int64)
        seg = np.searchsorted(starts, local, side="right") - 1
        shift = np.array([s.global_start - s.local_start for s in self.segments], dtype=np.int64)
        return local + shift[seg]

    def owned(self, global_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which of `global_ids` this process holds (bool mask) and their local positions (where held)."""
        g = np.asarray(global_ids, dtype=np.int64)
        mask = np.zeros(len(g), dtype=bool)
        local = np.zeros(len(g), dtype=np.int64)
        for s in self.segments:
            inside = (g >= s.global_start) & (g < s.global_start + len(s))
            mask |= inside
            local[inside] = g[inside] - s.global_start + s.local_start
        return mask, local

    # -- metadata ----------------------------------------------------------------------------------------
    @property
    def meta(self):
        """The metadata of this process's rows (pyarrow Table, local order)."""
        if self._meta is None:
            import pyarrow as pa

            tables = [s.store.meta.slice(s.start, len(s)) for s in self.segments]
            self._meta = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
        return self._meta

    @property
    def keys(self):
        """Source keys of this process's rows (pyarrow strings); the global row id where a store has none."""
        if self._keys is None:
            import pyarrow as pa

            parts = []
            for s in self.segments:
                meta = s.store.meta
                if "key" in meta.column_names and meta.column("key").null_count == 0:
                    parts.append(meta.column("key").combine_chunks().slice(s.start, len(s)).cast(pa.string()))
                else:
                    parts.append(pa.array([str(i) for i in range(s.global_start, s.global_start + len(s))],
                                          type=pa.string()))
            self._keys = pa.concat_arrays(parts) if len(parts) > 1 else parts[0]
        return self._keys

    def captions(self, local: np.ndarray) -> list:
        """The metadata captions at local positions (None where the stores have no caption column)."""
        if "caption" not in self.meta.column_names:
            return [None] * len(local)
        return self.meta.column("caption").take(np.asarray(local, dtype=np.int64)).to_pylist()

    def labels(self, labels_path: str | Path | None = None) -> np.ndarray | None:
        """Ground truth per row: from a labels file (key + is_poisoned/label) or the stores' `is_poisoned`."""
        if labels_path is not None:
            return read_labels(labels_path, self.keys)
        meta = self.meta
        if "is_poisoned" not in meta.column_names:
            return None
        col = meta.column("is_poisoned")
        if col.null_count == len(col):
            return None
        return np.asarray(col.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)


def _segments(stores: list[EmbeddingStore], sizes: list[int], rank: int, world: int) -> list[Segment]:
    """One rank's segments: an even row range of one store, or its round-robin share of shard stores."""
    total = int(sum(sizes))
    if len(stores) == 1:
        lo, hi = total * rank // world, total * (rank + 1) // world
        return [Segment(stores[0], lo, hi, lo, 0)] if hi > lo else []
    if len(stores) < world:
        raise InputError(f"{len(stores)} shard stores for {world} ranks: give at least one shard per rank")
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    out, local = [], 0
    for i in range(rank, len(stores), world):
        if sizes[i]:
            out.append(Segment(stores[i], 0, sizes[i], int(offsets[i]), local))
            local += sizes[i]
    return out


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
