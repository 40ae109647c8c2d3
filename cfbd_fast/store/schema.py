"""The metadata schema of a store: per-row metadata and skip-list parts (parquet), built, written and read back.

Every part is checked against the size and CRC its commit record lists before it is parsed.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import InputError, StoreFormatError

META_COLUMNS = ("caption", "key", "source", "is_poisoned")
SKIP_COLUMNS = ("key", "source", "reason", "detail")


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
