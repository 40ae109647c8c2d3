"""EmbeddingStore: a directory of memory-mapped embedding matrices, parquet metadata and one commit record.

The on-disk format is described in docs/store-format.md; the binary work is done by the C++ core (`_core`).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import zlib
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from . import _core
from ._version import __version__
from .errors import InputError, StoreFormatError
from .locking import LOCK_NAME, writer_lock
from .progress import progress_bar

FORMAT_NAME = "cfbd-store"
FORMAT_VERSION = int(_core.FORMAT_VERSION)
COMMIT_RECORD = "store.json"
META_DIR = "meta"
SKIP_DIR = "skipped"
DEFAULT_MATRICES = ("image", "text")
DTYPE_CODES = {"float16": 1, "bfloat16": 2, "float32": 3}
META_COLUMNS = ("caption", "key", "source", "is_poisoned")
SKIP_COLUMNS = ("key", "source", "reason", "detail")
# Commit-record keys the store itself manages; other top-level keys (e.g. "embed") are free-form records.
_RESERVED_KEYS = frozenset({"format", "format_version", "rows", "dim", "dtype", "matrices", "model", "pretrained",
                            "normalized", "cfbd_fast_version", "parts", "skipped", "sha256"})
MAX_DIM = 1 << 20
_MAX_RECORD_BYTES = 64 << 20
_PART_NAME = re.compile(r"^meta/part-[0-9]{6}\.parquet$")
_SKIP_PART_NAME = re.compile(r"^skipped/part-[0-9]{6}\.parquet$")
_MATRIX_NAME = re.compile(r"^[A-Za-z0-9_-]{1,23}$")
_NORM_TOLERANCE = 1e-2  # |norm - 1| allowed for rows to count as L2-normalised (fp16 rounding is ~1e-3)


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a store dtype name; bfloat16 is ml_dtypes.bfloat16."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if name not in DTYPE_CODES:
        raise InputError(f"unsupported dtype {name!r}: use one of {', '.join(DTYPE_CODES)}")
    return np.dtype(name)


def dtype_name(dtype: Any) -> str:
    """The store dtype name ('float16', 'bfloat16', 'float32') of a numpy dtype or name."""
    if isinstance(dtype, str) and dtype in DTYPE_CODES:
        return dtype
    name = np.dtype(dtype).name
    if name not in DTYPE_CODES:
        raise InputError(f"unsupported dtype {name!r}: use one of {', '.join(DTYPE_CODES)}")
    return name


def encode_commit_record(body: dict) -> bytes:
    """The bytes of store.json for `body`: the body plus `sha256` over its canonical JSON."""
    return (json.dumps({**body, "sha256": _body_digest(body)}, indent=2, sort_keys=True) + "\n").encode()


def _body_digest(body: dict) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _corrupt(record_path: Path, what: str) -> StoreFormatError:
    return StoreFormatError(f"{record_path}: corrupt commit record ({what}); restore the store from a copy")


def read_commit_record(path: str | os.PathLike) -> dict:
    """Read and validate PATH/store.json; returns the body (without `sha256`)."""
    path = Path(path)
    record_path = path / COMMIT_RECORD
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "no cfbd store here", str(path))
    if not path.is_dir():
        raise StoreFormatError(f"{path}: not a cfbd store (a store is a directory NAME.cfbd/)")
    try:
        raw = record_path.read_bytes()
    except FileNotFoundError:
        raise StoreFormatError(f"{path}: not a cfbd store (no {COMMIT_RECORD} commit record)") from None
    if len(raw) > _MAX_RECORD_BYTES:
        raise _corrupt(record_path, f"{len(raw)} bytes")
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _corrupt(record_path, f"not valid JSON: {exc}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT_NAME:
        raise StoreFormatError(f"{record_path}: not a cfbd store (no \"format\": \"{FORMAT_NAME}\")")
    version = record.get("format_version")
    if type(version) is not int or version < 1:
        raise _corrupt(record_path, f"format_version {version!r}")
    if version > FORMAT_VERSION:
        raise StoreFormatError(f"{record_path}: written by a newer format version (v{version}, this build reads "
                               f"v{FORMAT_VERSION}): upgrade cfbd-fast")
    body = {k: v for k, v in record.items() if k != "sha256"}
    if record.get("sha256") != _body_digest(body):
        raise _corrupt(record_path, "checksum mismatch")
    _validate_body(body, record_path)
    return body


def _validate_body(body: dict, record_path: Path) -> None:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise _corrupt(record_path, what)

    rows, dim = body.get("rows"), body.get("dim")
    need(type(rows) is int and rows >= 0, f"rows {rows!r}")
    need(type(dim) is int and 1 <= dim <= MAX_DIM, f"dim {dim!r}")
    need(body.get("dtype") in DTYPE_CODES, f"dtype {body.get('dtype')!r}")
    matrices = body.get("matrices")
    need(isinstance(matrices, list) and len(matrices) > 0 and len(set(map(str, matrices))) == len(matrices)
         and all(isinstance(m, str) and _MATRIX_NAME.match(m) for m in matrices), f"matrices {matrices!r}")
    for key in ("model", "pretrained", "cfbd_fast_version"):
        need(body.get(key) is None or isinstance(body.get(key), str), f"{key} {body.get(key)!r}")
    need(isinstance(body.get("normalized"), bool), f"normalized {body.get('normalized')!r}")
    parts = body.get("parts")
    need(isinstance(parts, list), "parts is not a list")
    skipped = body.get("skipped", [])
    need(isinstance(skipped, list), "skipped is not a list")
    for entries, pattern in ((parts, _PART_NAME), (skipped, _SKIP_PART_NAME)):
        for part in entries:
            need(isinstance(part, dict) and isinstance(part.get("file"), str) and bool(pattern.match(part["file"]))
                 and all(type(part.get(k)) is int and part[k] >= 0 for k in ("rows", "bytes", "crc32")),
                 f"part entry {part!r}")
        need(len({p["file"] for p in entries}) == len(entries), "a part file is listed twice")
    need(sum(p["rows"] for p in parts) == rows, f"part rows add up to {sum(p['rows'] for p in parts)}, not {rows}")


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
        return write_batches(path, arrays, batches, rows=rows, dtype=dtype, model=model, pretrained=pretrained,
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
                "skipped": self.skipped_count}

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


def write_batches(path: str | os.PathLike, arrays: Mapping[str, Any], batches: Iterator[tuple], rows: int,
                  dtype: Any = None, model: str | None = None, pretrained: str | None = None,
                  normalized: bool | None = None, progress: bool = False,
                  description: str = "writing store") -> EmbeddingStore:
    """Create a store from row-aligned sources, appending `(start, stop, meta_table_or_None)` batches in order.

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
    store = EmbeddingStore.create(path, dim=int(first.shape[1]), dtype=dtype, model=model, pretrained=pretrained,
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
    return EmbeddingStore.open(path)


def store_entries(path: Path) -> list[Path]:
    """What a store folder holds besides its lock file (empty for a new store)."""
    return [entry for entry in path.iterdir() if entry.name != LOCK_NAME]


def _rows_have_unit_norm(batch: np.ndarray, block_rows: int = 8192) -> bool:
    for start in range(0, len(batch), block_rows):
        norms = np.linalg.norm(batch[start:start + block_rows].astype(np.float32), axis=1)
        if not np.all(np.abs(norms - 1.0) <= _NORM_TOLERANCE):
            return False
    return True


def _remove_uncommitted_files(path: Path, body: dict) -> None:
    """Delete part files and a temporary commit record left by an append that never committed."""
    committed = {p["file"] for p in body["parts"] + body.get("skipped", [])}
    for folder in (META_DIR, SKIP_DIR):
        for part in (path / folder).glob("part-*.parquet"):
            if f"{folder}/{part.name}" not in committed:
                part.unlink()
    (path / (COMMIT_RECORD + ".tmp")).unlink(missing_ok=True)


def _record_fields(record: Mapping[str, Any] | None) -> dict:
    """Free-form commit-record fields, checked: JSON-serialisable and not one of the store's own keys."""
    if record is None:
        return {}
    if not isinstance(record, Mapping):
        raise InputError(f"record must be a dict of top-level fields, got {type(record).__name__}")
    reserved = sorted(set(record) & _RESERVED_KEYS)
    if reserved:
        raise InputError(f"record cannot set the store's own fields {reserved}")
    try:
        return json.loads(json.dumps(dict(record), sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InputError(f"record fields must be plain JSON values: {exc}") from None


def _part_entry(file: str, rows: int, data: bytes) -> dict:
    return {"file": file, "rows": rows, "bytes": len(data), "crc32": zlib.crc32(data)}


# ---- metadata ------------------------------------------------------------------------------------------

def _meta_schema(with_poison: bool, with_source: bool = False):
    import pyarrow as pa

    fields = [pa.field("row_id", pa.int64()), pa.field("caption", pa.string()), pa.field("key", pa.string())]
    if with_source:
        fields.append(pa.field("source", pa.string()))
    if with_poison:
        fields.append(pa.field("is_poisoned", pa.bool_()))
    return pa.schema(fields)


def _skip_schema():
    import pyarrow as pa

    return pa.schema([pa.field(name, pa.string()) for name in SKIP_COLUMNS])


def _as_table(meta: Any):
    import pyarrow as pa

    if isinstance(meta, pa.Table):
        return meta
    if isinstance(meta, Mapping):
        return pa.table({name: (np.asarray(col) if isinstance(col, np.ndarray) else col) for name, col in meta.items()})
    if hasattr(meta, "columns") and hasattr(meta, "iloc"):  # pandas DataFrame
        return pa.Table.from_pandas(meta, preserve_index=False)
    raise InputError(f"meta must be a dict of columns, a pyarrow Table or a pandas DataFrame, got {type(meta).__name__}")


def _meta_table(meta: Any, start: int, rows: int):
    """The metadata of one batch in the store's schema: row ids start..start+rows, caption, key[, is_poisoned]."""
    import pyarrow as pa

    table = _as_table(meta) if meta is not None else None
    columns = {"row_id": pa.array(np.arange(start, start + rows, dtype=np.int64))}
    if table is None:
        columns["caption"] = pa.nulls(rows, pa.string())
        columns["key"] = pa.nulls(rows, pa.string())
        return pa.table(columns, schema=_meta_schema(False))
    unknown = sorted(set(table.column_names) - set(META_COLUMNS) - {"row_id"})
    if unknown:
        raise InputError(f"meta has unknown columns {unknown}: expected {', '.join(META_COLUMNS)}")
    if table.num_rows != rows:
        raise InputError(f"meta has {table.num_rows} rows but the arrays have {rows}")
    with_poison = "is_poisoned" in table.column_names
    with_source = "source" in table.column_names
    for name, kind in (("caption", pa.string()), ("key", pa.string()), ("source", pa.string()),
                       ("is_poisoned", pa.bool_())):
        if (name == "is_poisoned" and not with_poison) or (name == "source" and not with_source):
            continue
        if name not in table.column_names:
            columns[name] = pa.nulls(rows, kind)
            continue
        try:
            columns[name] = table.column(name).cast(kind)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise InputError(f"meta column {name!r} cannot be read as {kind}: {exc}") from None
    return pa.table(columns, schema=_meta_schema(with_poison, with_source))


def _skip_table(skipped: Any):
    """Skip-list entries in the store's schema: key, source, reason, detail (all strings, may be null)."""
    import pyarrow as pa

    table = _as_table(skipped)
    unknown = sorted(set(table.column_names) - set(SKIP_COLUMNS))
    if unknown:
        raise InputError(f"skipped has unknown columns {unknown}: expected {', '.join(SKIP_COLUMNS)}")
    columns = {}
    for name in SKIP_COLUMNS:
        if name not in table.column_names:
            columns[name] = pa.nulls(table.num_rows, pa.string())
            continue
        try:
            columns[name] = table.column(name).cast(pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise InputError(f"skipped column {name!r} cannot be read as strings: {exc}") from None
    return pa.table(columns, schema=_skip_schema())


def _parquet_bytes(table) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _read_part(path: Path, part: dict, what: str):
    """One committed parquet part, its size and checksum checked against the commit record."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    part_path = path / part["file"]
    try:
        data = part_path.read_bytes()
    except FileNotFoundError:
        raise StoreFormatError(f"{part_path}: missing (the commit record lists it)") from None
    if len(data) != part["bytes"] or zlib.crc32(data) != part["crc32"]:
        raise StoreFormatError(f"{part_path}: corrupt {what} part (size or checksum differs from the commit record)")
    try:
        # No arrow thread pool for these small parts: its workers can outlive the interpreter and abort
        # the process at exit (apache/arrow#34314).
        return pq.read_table(pa.BufferReader(data), use_threads=False)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise StoreFormatError(f"{part_path}: unreadable {what} part ({exc})") from None


def _read_meta(path: Path, body: dict):
    import pyarrow as pa

    tables = []
    start = 0
    for part in body["parts"]:
        table = _read_part(path, part, "metadata")
        with_poison = "is_poisoned" in table.column_names
        with_source = "source" in table.column_names
        row_ids = table.column("row_id").to_numpy() if "row_id" in table.column_names else None
        if (table.schema != _meta_schema(with_poison, with_source) or table.num_rows != part["rows"]
                or not np.array_equal(row_ids, np.arange(start, start + part["rows"]))):
            raise StoreFormatError(f"{path / part['file']}: metadata part does not match the commit record (expected "
                                   f"{part['rows']} rows from row id {start} with columns row_id, caption, key)")
        tables.append(table)
        start += part["rows"]
    if not tables:
        return _meta_schema(False).empty_table()
    with_poison = any("is_poisoned" in t.column_names for t in tables)
    with_source = any("source" in t.column_names for t in tables)
    schema = _meta_schema(with_poison, with_source)
    filled = []
    for table in tables:
        for name, kind in (("source", pa.string()), ("is_poisoned", pa.bool_())):
            if schema.get_field_index(name) >= 0 and name not in table.column_names:
                table = table.append_column(name, pa.nulls(table.num_rows, kind))
        filled.append(table.select(schema.names))
    return pa.concat_tables(filled).cast(schema)


def _read_skipped(path: Path, body: dict):
    import pyarrow as pa

    tables = []
    for part in body.get("skipped", []):
        table = _read_part(path, part, "skip list")
        if table.schema != _skip_schema() or table.num_rows != part["rows"]:
            raise StoreFormatError(f"{path / part['file']}: skip-list part does not match the commit record (expected "
                                   f"{part['rows']} rows with columns {', '.join(SKIP_COLUMNS)})")
        tables.append(table)
    return pa.concat_tables(tables) if tables else _skip_schema().empty_table()
