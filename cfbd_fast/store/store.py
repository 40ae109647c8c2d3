"""EmbeddingStore: a directory of memory-mapped embedding matrices, parquet metadata and one commit record.

The on-disk format is described in docs/store-format.md; the binary work is done by the C++ core (`_core`).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from .. import _core
from .._version import __version__
from ..errors import InputError, StoreFormatError
from ..locking import writer_lock
from ..progress import progress_bar
from .record import (COMMIT_RECORD, DEFAULT_MATRICES, DTYPE_CODES, FORMAT_NAME, FORMAT_VERSION, MAX_DIM, META_DIR,
                     SKIP_DIR, _MATRIX_NAME, _body_digest, _part_entry, _record_fields, _remove_uncommitted_files,
                     dtype_name, encode_commit_record, numpy_dtype, read_commit_record, store_entries)
from .chunks import Chunk
from .schema import _as_table, _meta_table, _parquet_bytes, _read_meta, _read_skipped, _skip_table

class EmbeddingStore:
    """Embedding matrices (image, text, ...) of one model, with per-row metadata, stored as NAME.cfbd/.

    Open with `EmbeddingStore.open(path)` (read-only, instant whatever the size) or create with
    `EmbeddingStore.create(...)` / `EmbeddingStore.from_arrays(...)`. Matrix views (`store.image`) are
    zero-copy and read-only; `iter_chunks` streams with bounded memory.
    """

    def __init__(self, path: Path, core: Any, body: dict, writable: bool, lock: contextlib.ExitStack | None = None):
        self._path = path
        self._lock = lock
        self._core = core
        self._body = body
        self._writable = writable
        self._dtype = numpy_dtype(body["dtype"])
        self._meta = None

    # ---- opening and creating -------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, dim: int, dtype: Any = "float16", model: str | None = None,
               pretrained: str | None = None, normalized: bool = False,
               matrices: Sequence[str] = DEFAULT_MATRICES, record: Mapping[str, Any] | None = None) -> "EmbeddingStore":
        """Create an empty store at PATH (a new or empty directory) and return it open for appending.

        `record` adds free-form top-level fields to the commit record (e.g. {"embed": {...}}), see `append`.
        """
        path = Path(path)
        extra = _record_fields(record)
        name = dtype_name(dtype)
        if type(dim) is not int and not isinstance(dim, np.integer) or not 1 <= int(dim) <= MAX_DIM:
            raise InputError(f"dim must be an integer in 1..{MAX_DIM}, got {dim!r}")
        matrices = tuple(matrices)
        bad = [m for m in matrices if not isinstance(m, str) or not _MATRIX_NAME.match(m)]
        if not matrices or bad or len(set(matrices)) != len(matrices):
            raise InputError(f"matrix names must be distinct, 1-23 letters, digits, '_' or '-': got {matrices!r}")
        if path.exists() and not path.is_dir():
            raise InputError(f"{path} already exists; choose a new path or delete it")
        body = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "rows": 0,
            "dim": int(dim),
            "dtype": name,
            "matrices": list(matrices),
            "model": model,
            "pretrained": pretrained,
            "normalized": bool(normalized),
            "cfbd_fast_version": __version__,
            "parts": [],
            **extra,
        }
        path.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as lock:
            lock.enter_context(writer_lock(path, "store"))
            if store_entries(path):
                raise InputError(f"{path} already exists; choose a new path or delete it")
            (path / META_DIR).mkdir()
            core = _core.Store.create(str(path), list(matrices), DTYPE_CODES[name], int(dim))
            _core.replace_file_atomic(str(path / COMMIT_RECORD), encode_commit_record(body))
            return cls(path, core, body, writable=True, lock=lock.pop_all())

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> "EmbeddingStore":
        """Open a store: mode "r" reads, "a" appends after the committed rows (cutting off any uncommitted tail)."""
        if mode not in ("r", "a"):
            raise InputError(f"mode must be 'r' or 'a', got {mode!r}")
        path = Path(path)
        with contextlib.ExitStack() as lock:
            if mode == "a":
                read_commit_record(path)  # not a store: say so before taking a lock in it
                lock.enter_context(writer_lock(path, "store"))
            body = read_commit_record(path)
            store = cls._open_checked(path, body, mode)
            store._lock = lock.pop_all()
            return store

    @classmethod
    def _open_checked(cls, path: Path, body: dict, mode: str) -> "EmbeddingStore":
        for part in body["parts"] + body.get("skipped", []):
            part_path = path / part["file"]
            try:
                size = part_path.stat().st_size
            except FileNotFoundError:
                raise StoreFormatError(f"{part_path}: missing (the commit record lists it)") from None
            if size != part["bytes"]:
                raise StoreFormatError(f"{part_path}: truncated or overwritten: commit record says {part['bytes']} "
                                       f"bytes, the file holds {size}")
        core = _core.Store.open(str(path), body["matrices"], body["rows"], DTYPE_CODES[body["dtype"]], body["dim"],
                                mode == "a")
        if mode == "a":
            _remove_uncommitted_files(path, body)
        return cls(path, core, body, writable=mode == "a")

    @classmethod
    def from_arrays(cls, path: str | os.PathLike, image: Any = None, text: Any = None, meta: Any = None,
                    model: str | None = None, pretrained: str | None = None, normalized: bool | None = None,
                    batch_rows: int = 65536, dtype: Any = None, progress: bool = False,
                    **matrices: Any) -> "EmbeddingStore":
        """Write arrays (numpy, np.memmap or anything np.asarray takes) to a new store, `batch_rows` per commit.

        `normalized=None` checks whether every row has unit L2 norm. Returns the store opened read-only.
        """
        arrays = {name: a for name, a in (("image", image), ("text", text)) if a is not None}
        arrays.update(matrices)
        arrays = {name: a if hasattr(a, "shape") else np.asarray(a) for name, a in arrays.items()}
        if not arrays:
            raise InputError("from_arrays needs at least one matrix, e.g. image=..., text=...")
        first = next(iter(arrays.values()))
        rows = len(first)
        table = None if meta is None else _as_table(meta)
        if table is not None and table.num_rows != rows:
            raise InputError(f"meta has {table.num_rows} rows but the arrays have {rows}")
        ranges = ((start, min(start + batch_rows, rows)) for start in range(0, rows, max(1, int(batch_rows))))
        batches = ((s, e, None if table is None else table.slice(s, e - s)) for s, e in ranges)
        from .writing import write_batches

        return write_batches(cls, path, arrays, batches, rows=rows, dtype=dtype, model=model, pretrained=pretrained,
                             normalized=normalized, progress=progress)

    # ---- properties ------------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def dim(self) -> int:
        return self._body["dim"]

    @property
    def dtype(self) -> np.dtype:
        """numpy dtype of the rows (ml_dtypes.bfloat16 for bf16 stores)."""
        return self._dtype

    @property
    def matrices(self) -> tuple[str, ...]:
        return tuple(self._body["matrices"])

    @property
    def model(self) -> str | None:
        return self._body["model"]

    @property
    def pretrained(self) -> str | None:
        return self._body["pretrained"]

    @property
    def normalized(self) -> bool:
        return self._body["normalized"]

    @property
    def fingerprint(self) -> str:
        """16 hex digits identifying the committed content (from the commit record's checksum)."""
        return _body_digest(self._body)[:16]

    def __len__(self) -> int:
        return self._body["rows"]

    @property
    def info(self) -> dict:
        size = sum(f.stat().st_size for f in self._files())
        body = self._body
        return {"path": str(self._path), "rows": body["rows"], "dim": body["dim"], "dtype": body["dtype"],
                "matrices": list(body["matrices"]), "model": body["model"], "pretrained": body["pretrained"],
                "normalized": body["normalized"], "cfbd_fast_version": body["cfbd_fast_version"],
                "format_version": body["format_version"], "size_bytes": size, "fingerprint": self.fingerprint,
                "skipped": self.skipped_count, "complete": self.completion[0], "inputs_done": self.completion[1],
                "inputs_total": self.completion[2]}

    @property
    def completion(self) -> tuple[bool, int | None, int | None]:
        """(finished, inputs read, inputs in all) of the writer that made the store; an `embed` that was stopped
        is unfinished until the same command is run again. Counts are None when not known."""
        record = self._body.get("embed")
        if not isinstance(record, dict) or "units" not in record:
            return True, None, None  # written in one go (from_arrays and the importers remove what they leave)
        return record["position"][0] >= record["units"], record.get("inputs_done"), record.get("inputs_total")

    @property
    def skipped_count(self) -> int:
        """Number of inputs listed in the skip list (inputs a writer could not embed)."""
        return sum(p["rows"] for p in self._body.get("skipped", []))

    @property
    def record(self) -> dict:
        """A copy of the commit record's body (store.json without `sha256`), free-form fields included."""
        return json.loads(json.dumps(self._body))

    def _files(self) -> list[Path]:
        return ([self._path / COMMIT_RECORD] + [self._path / f"{m}.emb" for m in self._body["matrices"]]
                + [self._path / p["file"] for p in self._body["parts"] + self._body.get("skipped", [])])

    # ---- reading ---------------------------------------------------------------------------------------

    def matrix(self, name: str) -> np.ndarray:
        """Zero-copy read-only (rows, dim) view of a matrix; the mapping lives as long as the array."""
        core = self._open_core()
        if name not in self._body["matrices"]:
            raise KeyError(f"{self._path} has no matrix {name!r}; it holds {', '.join(self.matrices)}")
        view = core.view(name, self._body["rows"])
        return view.view(self._dtype) if view.dtype != self._dtype else view

    @property
    def image(self) -> np.ndarray:
        return self.matrix("image")

    @property
    def text(self) -> np.ndarray:
        return self.matrix("text")

    @property
    def meta(self):
        """Per-row metadata (pyarrow Table): row_id, caption, key and, when recorded, source and is_poisoned."""
        if self._meta is None:
            self._meta = _read_meta(self._path, self._body)
        return self._meta

    @property
    def skipped(self):
        """The skip list (pyarrow Table): key, source, reason, detail of each input that was not embedded."""
        return _read_skipped(self._path, self._body)

    def iter_chunks(self, rows: int = 65536, matrices: Sequence[str] | None = None, start: int = 0,
                    stop: int | None = None) -> Iterator[Chunk]:
        """Stream rows [start, stop) in chunks of `rows` rows, read ahead by a background thread (GIL released).

        `matrices` defaults to all of the store's (image, text). Chunk arrays are zero-copy read-only views of
        the files: a C++ thread faults chunk k+1 in while you work on chunk k, and the pages of chunks you have
        moved past are dropped from this process, so resident memory stays at about two chunks
        (2 x rows x dim x itemsize x matrices) whatever the store size. Arrays stay valid after the loop moves
        on (dropped pages are read again if touched); keep them as long as you like.
        """
        core = self._open_core()
        names = tuple(matrices) if matrices is not None else self.matrices
        unknown = [n for n in names if n not in self._body["matrices"]]
        if unknown or not names:
            raise InputError(f"{self._path} has matrices {', '.join(self.matrices)}; cannot stream {unknown or names}")
        stop = len(self) if stop is None else stop
        if not 0 <= start <= stop <= len(self) or rows < 1:
            raise InputError(f"iter_chunks: need 0 <= start <= stop <= {len(self)} and rows >= 1, "
                             f"got start={start}, stop={stop}, rows={rows}")
        reader = _core.ChunkReader(core, list(names), start, stop, rows)
        return self._chunks(reader, names)

    def _chunks(self, reader: Any, names: tuple[str, ...]) -> Iterator[Chunk]:
        try:
            while (item := reader.next()) is not None:
                start, stop, arrays = item
                if arrays[0].dtype != self._dtype:
                    arrays = [a.view(self._dtype) for a in arrays]
                yield Chunk(start, stop, dict(zip(names, arrays)))
        finally:
            reader.close()

    def health(self, rows: int = 16384, progress: bool = False) -> dict[str, dict[str, int]]:
        """Per matrix: rows holding NaN/inf (`nonfinite_rows`) and rows of norm zero (`zero_norm_rows`)."""
        counts = {name: {"nonfinite_rows": 0, "zero_norm_rows": 0} for name in self.matrices}
        with progress_bar("checking rows", total=len(self), enabled=progress) as bar:
            for chunk in self.iter_chunks(rows=rows):
                for name, array in chunk.arrays.items():
                    values = array.astype(np.float32)
                    finite = np.isfinite(values).all(axis=1)
                    squared = np.einsum("ij,ij->i", values, values)
                    counts[name]["nonfinite_rows"] += int((~finite).sum())
                    counts[name]["zero_norm_rows"] += int((finite & (squared == 0)).sum())
                bar.advance(len(chunk))
        return counts

    # ---- writing ---------------------------------------------------------------------------------------

    def append(self, image: Any = None, text: Any = None, meta: Any = None, *, skipped: Any = None,
               record: Mapping[str, Any] | None = None, **matrices: Any) -> None:
        """Append rows to every matrix plus their metadata as one committed batch.

        `meta` is a dict of columns, a pyarrow Table or a pandas DataFrame with `caption`, `key` and optionally
        `source` and `is_poisoned`; row ids are assigned. `skipped` (same kinds, columns key, source, reason,
        detail) adds entries to the store's skip list, and `record` replaces free-form top-level fields of the
        commit record (e.g. a writer's resume position), both in the same commit, which may hold zero rows.
        The batch is durable and visible once this returns; a crash before that leaves the store at its
        previous commit.
        """
        core = self._open_core()
        if not self._writable:
            raise InputError(f"{self._path} is open read-only; open it with mode='a' to append")
        given = {name: a for name, a in (("image", image), ("text", text)) if a is not None}
        given.update(matrices)
        if not given and meta is None and (skipped is not None or record is not None):
            given = {name: np.empty((0, self.dim), self._dtype) for name in self.matrices}  # a commit without rows
        if set(given) != set(self.matrices):
            raise InputError(f"append needs exactly one array per matrix ({', '.join(self.matrices)}), "
                             f"got {', '.join(given) or 'none'}")
        arrays = [self._prepare(name, given[name]) for name in self.matrices]
        rows = arrays[0].shape[0]
        if any(a.shape[0] != rows for a in arrays):
            raise InputError("append: every matrix needs the same number of rows, got "
                             + ", ".join(f"{n}={a.shape[0]}" for n, a in zip(self.matrices, arrays)))
        table = _meta_table(meta, start=len(self), rows=rows)
        skip_table = None if skipped is None else _skip_table(skipped)
        if skip_table is not None and skip_table.num_rows == 0:
            skip_table = None
        extra = _record_fields(record)
        if rows == 0 and skip_table is None and not extra:
            return
        body = {**self._body, **extra}
        files = []
        if rows:
            part_bytes = _parquet_bytes(table)
            part_file = f"{META_DIR}/part-{len(self._body['parts']):06d}.parquet"
            body.update(rows=len(self) + rows, parts=self._body["parts"] + [_part_entry(part_file, rows, part_bytes)])
            files.append((part_file, part_bytes))
        if skip_table is not None:
            listed = self._body.get("skipped", [])
            skip_bytes = _parquet_bytes(skip_table)
            skip_file = f"{SKIP_DIR}/part-{len(listed):06d}.parquet"
            body["skipped"] = listed + [_part_entry(skip_file, skip_table.num_rows, skip_bytes)]
            files.append((skip_file, skip_bytes))
        try:
            if rows:
                core.append(arrays)
            if skip_table is not None:
                (self._path / SKIP_DIR).mkdir(exist_ok=True)
            for name, data in files:
                _core.write_file_durable(str(self._path / name), data)
            _core.replace_file_atomic(str(self._path / COMMIT_RECORD), encode_commit_record(body))
        except BaseException:
            # On disk the store is at its last commit (or this one); reopening with mode="a" resumes cleanly.
            # A half-written commit record (disk full) goes now, not at the next open.
            (self._path / (COMMIT_RECORD + ".tmp")).unlink(missing_ok=True)
            self.close()
            raise
        self._body = body
        self._meta = None

    def _set_record_fields(self, **fields: Any) -> None:
        """Publish a new commit record with some descriptive fields changed (rows and parts untouched)."""
        self._open_core()
        body = {**self._body, **fields}
        _core.replace_file_atomic(str(self._path / COMMIT_RECORD), encode_commit_record(body))
        self._body = body

    def _prepare(self, name: str, array: Any) -> np.ndarray:
        array = np.asarray(array)
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise InputError(f"{name} must have shape (rows, {self.dim}), got {array.shape}")
        return np.ascontiguousarray(array, dtype=self._dtype)

    # ---- lifetime --------------------------------------------------------------------------------------

    def _open_core(self) -> Any:
        if self._core is None:
            raise InputError(f"{self._path}: the store is closed; open it again")
        return self._core

    def close(self) -> None:
        """Release the files. Arrays already handed out stay valid (each keeps its own mapping)."""
        self._core = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> "EmbeddingStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._core is None else ("appendable" if self._writable else "read-only")
        return (f"EmbeddingStore({str(self._path)!r}, rows={len(self)}, dim={self.dim}, dtype={self._body['dtype']}, "
                f"model={self.model!r}, {state})")
