"""One rank's rows: a row range of one store, or its round-robin share of shard stores, read as chunks in local
positions; and the global row ids those positions stand for.

Global row ids number the rows of the shard stores one after the other in the order given (the rows of one store
as they are), so a distributed run names every row as a single process over the same rows would.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import InputError
from ..store import Chunk, EmbeddingStore


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


class RankRows:
    """The rows one rank scans (the `source` its passes read): `rows` local positions over its segments."""

    def __init__(self, paths: list[str | Path], rank: int, world: int):
        if not paths:
            raise InputError("no store to scan: give a store, or --shards matching at least one store")
        opened = [EmbeddingStore.open(p) for p in paths]
        first = opened[0]
        for st in opened[1:]:
            if (st.dim, st.dtype, st.model) != (first.dim, first.dtype, first.model):
                raise InputError(f"{st.path}: dim {st.dim}, dtype {st.dtype}, model {st.model} differ from "
                                 f"{first.path} ({first.dim}, {first.dtype}, {first.model}): shards must match")
        sizes = [len(st) for st in opened]
        self.total_rows = int(sum(sizes))
        if self.total_rows == 0:
            raise InputError(f"{first.path}: the store is empty (0 rows); add rows before scanning")
        offsets = np.concatenate(([0], np.cumsum(sizes)))
        self.stores = opened
        self.store = first  # what the passes ask of "the store": dtype and matrix kinds (every shard matches it)
        self.segments: list[Segment] = []
        local = 0
        if len(opened) == 1:  # one store: an even row range per rank
            lo, hi = self.total_rows * rank // world, self.total_rows * (rank + 1) // world
            if hi > lo:
                self.segments.append(Segment(first, lo, hi, lo, 0))
                local = hi - lo
        else:  # shard stores, assigned round-robin
            if len(opened) < world:
                raise InputError(f"{len(opened)} shard stores for {world} ranks: give at least one shard per rank")
            for i in range(rank, len(opened), world):
                if sizes[i]:
                    self.segments.append(Segment(opened[i], 0, sizes[i], int(offsets[i]), local))
                    local += sizes[i]
        if local == 0:
            raise InputError(f"rank {rank} of {world} has no rows to scan: run fewer ranks")
        self.rows = local
        self.dim = first.dim
        self.path = first.path if len(opened) == 1 else Path(f"{first.path} (+{len(opened) - 1} shards)")
        self._meta = None
        self._keys = None

    # -- what the passes read ----------------------------------------------------------------------------
    def chunks(self, rows: int, matrices: tuple[str, ...] = ("image", "text")) -> Iterator[Chunk]:
        """Chunks whose start/stop are local positions."""
        for seg in self.segments:
            for chunk in seg.store.iter_chunks(rows=rows, matrices=matrices, start=seg.start, stop=seg.stop):
                shift = seg.local_start - seg.start
                yield Chunk(chunk.start + shift, chunk.stop + shift,
                            {name: getattr(chunk, name) for name in matrices})

    # -- ids ---------------------------------------------------------------------------------------------
    def global_ids(self, local: np.ndarray) -> np.ndarray:
        local = np.asarray(local, dtype=np.int64)
        starts = np.array([s.local_start for s in self.segments], dtype=np.int64)
        seg = np.searchsorted(starts, local, side="right") - 1
        shift = np.array([s.global_start - s.local_start for s in self.segments], dtype=np.int64)
        return local + shift[seg]

    def all_global_ids(self) -> np.ndarray:
        return np.concatenate([np.arange(s.global_start, s.global_start + len(s), dtype=np.int64)
                               for s in self.segments])

    def owned(self, global_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which of `global_ids` this rank holds (bool mask) and their local positions (where held)."""
        g = np.asarray(global_ids, dtype=np.int64)
        mask = np.zeros(len(g), dtype=bool)
        local = np.zeros(len(g), dtype=np.int64)
        for s in self.segments:
            inside = (g >= s.global_start) & (g < s.global_start + len(s))
            mask |= inside
            local[inside] = g[inside] - s.global_start + s.local_start
        return mask, local

    # -- row data ----------------------------------------------------------------------------------------
    def gather(self, matrix: str, local: np.ndarray) -> np.ndarray:
        """float32 rows of one matrix at local positions, in the order asked."""
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

    @property
    def meta(self):
        """The metadata of this rank's rows (pyarrow Table, local order)."""
        if self._meta is None:
            import pyarrow as pa

            tables = [s.store.meta.slice(s.start, len(s)) for s in self.segments]
            self._meta = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
        return self._meta

    @property
    def keys(self):
        """Source keys of this rank's rows (pyarrow strings); the global row id where a store has none."""
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

    def labels(self, labels_path: str | Path | None = None) -> np.ndarray | None:
        """Ground truth of this rank's rows: from a labels file, or the stores' `is_poisoned` column (None where
        absent)."""
        if labels_path is not None:
            from ..pipeline.source import read_labels

            return read_labels(labels_path, self.keys)
        meta = self.meta
        if "is_poisoned" not in meta.column_names:
            return None
        col = meta.column("is_poisoned")
        if col.null_count == len(col):
            return None
        return np.asarray(col.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)

    def captions(self, local: np.ndarray) -> list:
        if "caption" not in self.meta.column_names:
            return [None] * len(local)
        return self.meta.column("caption").take(np.asarray(local, dtype=np.int64)).to_pylist()

    @property
    def identity(self) -> dict:
        first = self.stores[0]
        info = first.info
        ident = {"path": str(first.path), "fingerprint": first.fingerprint, "rows": self.total_rows, "dim": self.dim,
                 "dtype": str(first.dtype), "model": info.get("model"), "pretrained": info.get("pretrained")}
        if len(self.stores) > 1:
            ident["shards"] = [{"path": str(st.path), "fingerprint": st.fingerprint, "rows": len(st)}
                               for st in self.stores]
        return ident
