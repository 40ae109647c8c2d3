"""The commit record of a store (store.json): format constants, dtypes, encoding, reading and validation.

The record lists every committed file with its size and CRC; docs/store-format.md describes the format.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .. import _core
from ..errors import InputError, StoreFormatError
from ..locking import LOCK_NAME

FORMAT_NAME = "cfbd-store"
FORMAT_VERSION = int(_core.FORMAT_VERSION)
COMMIT_RECORD = "store.json"
META_DIR = "meta"
SKIP_DIR = "skipped"
DEFAULT_MATRICES = ("image", "text")
DTYPE_CODES = {"float16": 1, "bfloat16": 2, "float32": 3}
# Commit-record keys the store itself manages; other top-level keys (e.g. "embed") are free-form records.
_RESERVED_KEYS = frozenset({"format", "format_version", "rows", "dim", "dtype", "matrices", "model", "pretrained",
                            "normalized", "cfbd_fast_version", "parts", "skipped", "sha256"})
MAX_DIM = 1 << 20
_MAX_RECORD_BYTES = 64 << 20
_PART_NAME = re.compile(r"^meta/part-[0-9]{6}\.parquet$")
_SKIP_PART_NAME = re.compile(r"^skipped/part-[0-9]{6}\.parquet$")
_MATRIX_NAME = re.compile(r"^[A-Za-z0-9_-]{1,23}$")


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


def store_entries(path: Path) -> list[Path]:
    """What a store folder holds besides its lock file (empty for a new store)."""
    return [entry for entry in path.iterdir() if entry.name != LOCK_NAME]



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


def _remove_uncommitted_files(path: Path, body: dict) -> None:
    """Delete part files and a temporary commit record left by an append that never committed."""
    committed = {p["file"] for p in body["parts"] + body.get("skipped", [])}
    for folder in (META_DIR, SKIP_DIR):
        for part in (path / folder).glob("part-*.parquet"):
            if f"{folder}/{part.name}" not in committed:
                part.unlink()
    (path / (COMMIT_RECORD + ".tmp")).unlink(missing_ok=True)
