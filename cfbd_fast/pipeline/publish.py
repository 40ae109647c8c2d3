"""The scan's one writer: every process writes the files of its rows, and the output folder's writer publishes
them, `summary.json` last: a folder is a scan's output when it holds summary.json, and then every file in it is
that scan's.

scores.parquet (every row's scores) and keep.parquet (the kept rows' metadata, every column the store has) are one
file from one process over one store, else folders of parts, one per shard or rank's row range, named by their
first row id, so that `pyarrow.dataset` (and pandas, polars, DuckDB) read each as one table in row order and no
process joins them. poisoned.txt / keep.txt / invalid.txt (source keys) and flagged.csv (each flagged row's key,
caption and scores) are single files: each process writes its bytes at its offset. The writer holds the output
folder's writer lock for the whole scan (`output_folder`).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from ..errors import CfbdError, InputError
from .options import SUBSETS, V_BENIGN, V_INVALID, V_POISONED, VERDICTS

TABLES = ("scores.parquet", "keep.parquet")
TEXTS = ("poisoned.txt", "keep.txt", "invalid.txt", "flagged.csv")
SUMMARY = "summary.json"
REPORT = "report.html"
OUTPUT_FILES = (*TABLES, *TEXTS, SUMMARY)
REPLACED = (*OUTPUT_FILES, REPORT)  # what --force removes: a scan's files, never anything else in the folder
LISTS = {"poisoned.txt": V_POISONED, "keep.txt": V_BENIGN, "invalid.txt": V_INVALID}
FLAGGED_COLUMNS = ("s_o", "c", "z", "score", "p_value", "cluster")


class OutputError(CfbdError, OSError):
    """The outputs could not be written (disk full, no permission): nothing was published."""


def json_default(o):
    """`json.dumps(default=...)` for the numpy scalars and arrays in a summary."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# -- the folder ---------------------------------------------------------------------------------------------------
def check_out_dir(out_dir: str | Path, force: bool = False) -> Path:
    """Refuse an output path that is a file, under a missing folder, or a folder holding scan outputs (unless
    force). Run under the folder's writer lock, so two scans started together cannot both pass it."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file: give a folder for the scan's outputs")
    if (out / "store.json").exists() or (out.parent / "store.json").exists():
        raise InputError(f"--out {out} is inside a store: give a folder outside the store for the scan's outputs")
    if out.is_dir() and not force and any((out / name).exists() for name in REPLACED):
        raise InputError(f"--out {out} already holds scan outputs: pass --force to replace them or choose another "
                         "folder")
    if out.parent and not out.parent.exists():
        raise InputError(f"--out {out}: its parent folder {out.parent} does not exist")
    return out


@contextlib.contextmanager
def output_folder(out: str | Path, comm, force: bool = False):
    """The output folder, checked and locked by the root process for the body of the `with` (the whole scan):
    a second scan of the same folder refuses at once, naming the holder's pid. Every rank gets the same error."""
    from ..locking import writer_lock

    out = Path(out)
    with contextlib.ExitStack() as stack:
        error = None
        if comm.is_root:
            try:
                check_out_dir(out, force=True)
                created = not out.exists()
                out.mkdir(exist_ok=True)
                stack.enter_context(writer_lock(out, "scan output folder"))
                if created:  # a failed scan leaves no folder behind (removed while the lock is still held)
                    stack.push(lambda failed, *_: _remove_unused(out) if failed else None)
                check_out_dir(out, force=force)
            except CfbdError as exc:
                error = str(exc)
        errors = comm.gather_objects(error, "check the output folder")
        if errors[0] is not None:
            raise InputError(errors[0])
        yield out


def _remove_unused(out: Path) -> None:
    """Remove the output folder a failed scan created, when it holds nothing but its lock file."""
    from ..locking import LOCK_NAME

    try:
        if os.listdir(out) == [LOCK_NAME]:
            os.unlink(out / LOCK_NAME)
            out.rmdir()
    except OSError:  # another writer created its lock file meanwhile: the folder is its
        pass


# -- writing ------------------------------------------------------------------------------------------------------
def publish(result, out: str | Path, comm, *, before_commit=None) -> Path:
    """Write `result` (this process's rows) into `out` with every other process's, then commit: summary.json
    (result.summary, completed with `out` and the publish time) written last. `before_commit(folder)` runs on the
    root with the finished files in `folder` (the report) and returns what to add to the summary. A failure on
    any process leaves nothing published and no temporary folder."""
    import time

    t0 = time.perf_counter()
    out = Path(out)
    token = comm.gather_objects(uuid.uuid4().hex[:12] if comm.is_root else None, "name the output folder")[0]
    tmp = out / f".cfbd-scan-{token}.tmp"
    segments = result.source.segments
    parts = comm.world > 1 or len(result.source.stores) > 1
    try:
        if comm.is_root:
            _written(tmp, lambda: [(tmp / name).mkdir(parents=True) for name in TABLES] if parts else tmp.mkdir())
        comm.barrier("create the output folder")
        if not tmp.is_dir():
            raise InputError(f"--out {out}: rank {comm.rank} cannot see {tmp.name}: give an --out folder on a "
                             "filesystem every rank shares")
        if parts:
            schema = _common_schema(comm, [_kept_meta(result, seg) for seg in segments])
            for seg in segments:
                _write_tables(tmp, result, seg, schema)
        else:
            _write_tables(tmp, result, None, None)
        _write_texts(tmp, result, comm, segments if parts else None)
        comm.barrier("write the parts")
        if comm.is_root:
            summary = result.summary
            summary["out"] = str(out)
            summary["timings_s"]["publish"] = round(time.perf_counter() - t0, 4)
            _write_summary(tmp, summary)
            if before_commit is not None:
                summary.update(before_commit(tmp))
                _write_summary(tmp, summary)
            _commit(tmp, out)
        comm.barrier("publish")
    except BaseException:
        if comm.is_root:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _written(path: Path, write):
    """Run `write`; a failing write (disk full, no permission) becomes one line naming `path`."""
    try:
        return write()
    except OSError as exc:
        if isinstance(exc, CfbdError):
            raise
        reason = exc.strerror or (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        shown = Path(*(part for part in path.parts if not part.startswith(".cfbd-scan-")))  # where it was going
        raise OutputError(f"{shown}: cannot write the scan's outputs ({reason}): free space or choose another "
                          "--out; nothing was published") from exc


def _write_summary(tmp: Path, summary: dict) -> None:
    text = json.dumps(summary, indent=2, default=json_default) + "\n"
    _written(tmp / SUMMARY, lambda: (tmp / SUMMARY).write_text(text))


def _scores_table(result, sl: slice, row_id: np.ndarray):
    import pyarrow as pa

    return pa.table({
        "row_id": row_id, "key": result.keys[sl],
        "s_o": result.s_o[sl], "s_g": result.s_g[sl], "c": result.c[sl], "posterior": result.posterior[sl],
        "subset": pa.DictionaryArray.from_arrays(result.subset[sl], pa.array(SUBSETS, pa.string())),
        "z": result.z[sl], "score": result.score[sl], "p_value": result.p_value[sl], "cluster": result.cluster[sl],
        "verdict": pa.DictionaryArray.from_arrays(result.verdict[sl], pa.array(VERDICTS, pa.string())),
    })


def _kept_meta(result, seg):
    """The kept rows' metadata of one segment (all rows with seg None), row ids global."""
    import pyarrow as pa

    lo, n = (0, len(result.verdict)) if seg is None else (seg.local_start, len(seg))
    meta = result.meta.slice(lo, n)
    row_id = result.row_id[lo:lo + n]
    if meta.num_columns == 0:
        meta = pa.table({"row_id": row_id})
    elif "row_id" in meta.column_names:  # a shard numbers its own rows: give them their global ids
        meta = meta.set_column(meta.column_names.index("row_id"), "row_id", pa.array(row_id))
    return meta.take(pa.array(np.flatnonzero(result.verdict[lo:lo + n] == V_BENIGN)))


def _common_schema(comm, tables):
    """One schema for every part (shards may type an all-null column differently), agreed on by all ranks."""
    import pyarrow as pa

    every = [s for rank in comm.gather_objects([t.schema for t in tables], "agree on the parts' schema")
             for s in rank]
    return pa.unify_schemas(every, promote_options="permissive")


def _conform(table, schema):
    """`table` with `schema`'s columns in its order and types (nulls where the table lacks a column)."""
    import pyarrow as pa

    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def _write_tables(tmp: Path, result, seg, schema) -> None:
    """scores.parquet and keep.parquet: the files (seg None), or the parts of one segment."""
    import pyarrow.parquet as pq

    if seg is None:
        files = [tmp / name for name in TABLES]
        sl, row_id = slice(None), result.row_id
    else:
        files = [tmp / name / f"part-{seg.global_start:015d}.parquet" for name in TABLES]
        sl = slice(seg.local_start, seg.local_start + len(seg))
        row_id = result.row_id[sl]
    kept = _kept_meta(result, seg)
    if schema is not None:
        kept = _conform(kept, schema)
    for path, table in zip(files, (_scores_table(result, sl, row_id), kept)):
        _written(path, lambda: _durable(path, lambda: pq.write_table(table, path)))


def _durable(path: Path, write) -> None:
    write()
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _segment_slices(result, segments):
    """(first row id, local slice) of each segment's rows; one process over one store: one slice of all rows."""
    if segments is None:
        return [(0, slice(0, len(result.verdict)))]
    return [(seg.global_start, slice(seg.local_start, seg.local_start + len(seg))) for seg in segments]


def _flagged_csv(result, sl: slice, header: bool) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.csv as pacsv

    flagged = np.flatnonzero(result.verdict[sl] == V_POISONED) + (sl.start or 0)
    columns = {"row_id": pa.array(result.row_id[flagged]), "key": result.keys.take(pa.array(flagged))}
    if "caption" in result.meta.column_names:
        columns["caption"] = result.meta.column("caption").take(pa.array(flagged))
    for name in FLAGGED_COLUMNS:
        columns[name] = pa.array(getattr(result, name)[flagged])
    table = pa.table(columns)
    if header:
        table = table.slice(0, 0)
    elif len(flagged) == 0:
        return b""
    buffer = io.BytesIO()
    pacsv.write_csv(table, buffer, pacsv.WriteOptions(include_header=header))
    return buffer.getvalue()


def _key_lines(result, sl: slice, code: int) -> bytes:
    """The keys of the rows with verdict `code`, one a line (built from the string buffer, no Python loop)."""
    import pyarrow as pa

    rows = np.flatnonzero(result.verdict[sl] == code) + (sl.start or 0)
    keys = result.keys.take(pa.array(rows)).cast(pa.large_string())
    if len(keys) == 0:
        return b""
    offsets = np.frombuffer(keys.buffers()[1], dtype=np.int64)[keys.offset:keys.offset + len(keys) + 1]
    data = np.frombuffer(keys.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
    out = np.empty(len(data) + len(keys), dtype=np.uint8)
    newline = offsets[1:] - offsets[0] + np.arange(len(keys))
    text = np.ones(len(out), dtype=bool)
    text[newline] = False
    out[newline] = ord("\n")
    out[text] = data
    return out.tobytes()


def _write_texts(tmp: Path, result, comm, segments) -> None:
    """The single-file lists: each segment's bytes written at its offset (segments in row order), into files the
    root creates at their full size (flagged.csv with its header)."""
    header = _flagged_csv(result, slice(0, 0), header=True)
    mine = []
    for start, sl in _segment_slices(result, segments):
        pieces = {name: _key_lines(result, sl, code) for name, code in LISTS.items()}
        pieces["flagged.csv"] = _flagged_csv(result, sl, header=False)
        mine.append((start, pieces))
    every = sorted(s for rank in comm.gather_objects([(start, {k: len(v) for k, v in pieces.items()})
                                                      for start, pieces in mine], "size the lists") for s in rank)
    offsets, totals = {}, {}
    for name in TEXTS:
        at = len(header) if name == "flagged.csv" else 0
        for start, sizes in every:
            offsets[start, name] = at
            at += sizes[name]
        totals[name] = at
    if comm.is_root:
        for name in TEXTS:
            _written(tmp / name, lambda name=name: _create(tmp / name, header if name == "flagged.csv" else b"",
                                                            totals[name]))
    comm.barrier("create the lists")
    for start, pieces in mine:
        for name, data in pieces.items():
            _written(tmp / name, lambda name=name, data=data: _write_at(tmp / name, data, offsets[start, name]))


def _create(path: Path, head: bytes, size: int) -> None:
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(size)


def _write_at(path: Path, data: bytes, offset: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        view = memoryview(data)
        while view:
            done = os.pwrite(fd, view, offset)
            view, offset = view[done:], offset + done
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, out: Path) -> None:
    """Replace the folder's scan files with tmp's, the old summary.json removed first and the new one moved in
    last; then remove the old files."""
    trash = out / f"{tmp.name}.old"
    trash.mkdir()
    for name in (SUMMARY, *[n for n in REPLACED if n != SUMMARY]):
        if os.path.lexists(out / name):
            os.replace(out / name, trash / name)
    for name in sorted(os.listdir(tmp), key=lambda n: n == SUMMARY):
        os.replace(tmp / name, out / name)
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.rmdir()
    shutil.rmtree(trash, ignore_errors=True)
