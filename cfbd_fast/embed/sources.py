"""Inputs of `cfbd-fast embed`: CSV/TSV tables, img2dataset `files` folders and webdataset tar shards.

Each reader yields `Sample`s in a fixed order, split into units (the table, one parquet shard, one tar) so that a
resumed run can start at (unit, offset) without reading what came before; `open_source` detects the format.
"""
from __future__ import annotations

import csv
import glob as globlib
import hashlib
import json
import os
import re
import sys
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from ..errors import InputError

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
CAPTION_SUFFIXES = ("txt",)
_TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}
_TRUE = {"1", "true", "t", "yes", "y"}
_FALSE = {"0", "false", "f", "no", "n", ""}
# webdataset's rule: the key is the member path up to the first dot of its file name.
_WDS_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class Sample(NamedTuple):
    """One input pair. Exactly one of `image_path`/`image_bytes` is set unless `skip` says why it is unusable."""

    key: str | None
    source: str | None
    caption: str | None
    image_path: str | None = None
    image_bytes: bytes | None = None
    is_poisoned: bool | None = None
    skip: tuple[str, str] | None = None  # (reason, detail), decided by the reader (e.g. a failed download)


@dataclass
class Unit:
    """A resumable piece of the input: `items(start)` yields its samples from position `start` on."""

    name: str
    items: Callable[[int], Iterator[Sample]]
    expected: int | None = None  # number of samples, when known without reading the data


@dataclass
class Source:
    """A detected input: its kind, the path as given, its units in order and an identity for resume checks."""

    kind: str
    path: str
    units: list[Unit]
    fingerprint: str
    options: dict = field(default_factory=dict)
    has_poison_labels: bool = False

    @property
    def expected(self) -> int | None:
        counts = [u.expected for u in self.units]
        return None if any(c is None for c in counts) else sum(counts)

    def identity(self) -> dict:
        """What a resumed run must match: kind, content fingerprint and the options that shape the rows."""
        return {"kind": self.kind, "path": self.path, "fingerprint": self.fingerprint, **self.options}


def open_source(data: str | os.PathLike, image_column: str = "image", caption_column: str = "caption") -> Source:
    """Detect what DATA is (table file, img2dataset folder, tar shards or a glob of them) and open it."""
    text = os.fspath(data)
    path = Path(text)
    if not path.exists() and any(ch in text for ch in "*?["):
        tars = sorted(p for p in globlib.glob(text) if _is_tar(p))
        if not tars:
            raise InputError(f"{text}: the pattern matches no .tar shards; check the path")
        return _webdataset(text, [Path(p) for p in tars])
    if not path.exists():
        raise InputError(f"{text}: no such file or folder; give a CSV/TSV file, an img2dataset output folder or "
                         "webdataset .tar shards")
    if path.is_file():
        if _is_tar(text):
            return _webdataset(text, [path])
        if path.suffix.lower() in _TABLE_SUFFIXES or path.suffix.lower() == ".txt":
            return _table(path, text, image_column, caption_column)
        raise InputError(f"{text}: not a .csv/.tsv table or a .tar shard; give a CSV/TSV file, an img2dataset "
                         "output folder or webdataset .tar shards")
    tars = sorted(p for p in path.iterdir() if p.is_file() and _is_tar(p.name))
    if tars:
        return _webdataset(text, tars)
    parquets = sorted(p for p in path.glob("*.parquet") if (path / p.stem).is_dir())
    if parquets:
        return _img2dataset(text, path, parquets, caption_column)
    if (path / "data.csv").is_file():  # a dataset folder as `cfbd-fast poison` writes it
        return _table(path / "data.csv", os.path.join(text, "data.csv"), image_column, caption_column)
    raise InputError(f"{text}: found neither .tar shards, img2dataset shards (NNNNN.parquet beside a NNNNN/ "
                     "folder) nor a data.csv; point embed at a CSV/TSV file, an img2dataset output folder or .tar "
                     "shards")


def _is_tar(name: str | os.PathLike) -> bool:
    name = os.fspath(name).lower()
    return name.endswith((".tar", ".tar.gz", ".tgz"))


def _hash_files(paths: list[Path], content: bool) -> str:
    """sha256 over each file's name and either its bytes (small index files) or its size (large shards)."""
    digest = hashlib.sha256()
    for p in paths:
        digest.update(p.name.encode() + b"\0")
        if content:
            with open(p, "rb") as fh:
                while block := fh.read(1 << 20):
                    digest.update(block)
        else:
            digest.update(str(p.stat().st_size).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def _parse_bool(value: str | None, where: str) -> bool | None:
    if value is None:
        return None
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InputError(f"{where}: is_poisoned value {value!r} is not 0/1 or true/false")


# ---- CSV / TSV -----------------------------------------------------------------------------------------

def _open_table(path: Path):
    csv.field_size_limit(min(sys.maxsize, 1 << 30))
    # bytes that are not UTF-8 are kept as lone surrogates, so that one bad row is skipped, not the file refused
    fh = open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")
    delimiter = _TABLE_SUFFIXES.get(path.suffix.lower(), "\t")
    return fh, csv.reader(fh, delimiter=delimiter)


_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of bytes that are not UTF-8


def _not_utf8(values) -> bool:
    return any(_NOT_UTF8.search(v) for v in values)


def _looks_like_url(value: str) -> bool:
    return value.strip().lower().startswith(("http://", "https://"))


def _table_rows(path: Path, text: str, reader) -> Iterator[list[str]]:
    """The reader's rows, with malformed content turned into a one-line InputError naming the line."""
    try:
        yield from reader
    except csv.Error as exc:
        where = f"{text} line {reader.line_num + 1}" if reader.line_num else text
        raise InputError(f"{where}: not a readable table ({exc}); fix or re-export the file") from None


def _table(path: Path, text: str, image_column: str, caption_column: str) -> Source:
    fh, reader = _open_table(path)
    with fh:
        rows = _table_rows(path, text, reader)
        header = next(rows, None)
        if header is None:
            raise InputError(f"{text}: empty file; expected a header line with {image_column!r} and "
                             f"{caption_column!r} columns")
        if _not_utf8(header):
            raise InputError(f"{text} line 1: the header is not UTF-8; re-export the file as UTF-8")
        rows = sum(1 for _ in rows)
    columns = [c.strip() for c in header]
    if image_column not in columns:
        if len(columns) >= 2 and _looks_like_url(columns[1]) and not _looks_like_url(columns[0]):
            raise InputError(f"{text} looks like a CC3M-style caption<TAB>url list (no header, image URLs): "
                             "download the images with img2dataset first (add the header line 'caption<TAB>url', "
                             "then: img2dataset --url_list FILE --input_format tsv --url_col url --caption_col "
                             "caption --output_format files --output_folder images) and embed that folder")
        hint = ("; it lists URLs: download the images with img2dataset first and embed its output folder"
                if "url" in columns else "; name the columns with --image-column/--caption-column")
        raise InputError(f"{text}: no image column {image_column!r} (columns: {', '.join(columns)}){hint}")
    if caption_column not in columns:
        raise InputError(f"{text}: no caption column {caption_column!r} (columns: {', '.join(columns)}); name it "
                         "with --caption-column")
    image_at, caption_at = columns.index(image_column), columns.index(caption_column)
    poison_at = columns.index("is_poisoned") if "is_poisoned" in columns else None
    folder = path.parent

    def items(start: int) -> Iterator[Sample]:
        fh, reader = _open_table(path)
        with fh:
            rows = _table_rows(path, text, reader)
            next(rows, None)
            first = reader.line_num + 1  # the file line where the next row starts (a quoted field may span lines)
            for position, row in enumerate(rows):
                where, first = f"{text} line {first}", reader.line_num + 1
                if position < start:
                    continue
                if _not_utf8(row):
                    yield Sample(None, None, None, skip=("not UTF-8", f"{where}: bytes that are not UTF-8; re-export "
                                                                      "the file as UTF-8"))
                    continue
                image = row[image_at].strip() if image_at < len(row) else ""
                caption = row[caption_at] if caption_at < len(row) else None
                poisoned = _parse_bool(row[poison_at] if poison_at < len(row) else None, where) \
                    if poison_at is not None else None
                source = str(folder / image) if image else None
                if not image:
                    yield Sample(None, None, caption, is_poisoned=poisoned, skip=("no image", f"{where}: empty"))
                elif not caption or not caption.strip():
                    yield Sample(image, source, caption, is_poisoned=poisoned, skip=("no caption", where))
                else:
                    yield Sample(image, source, caption, image_path=source, is_poisoned=poisoned)

    kind = "tsv" if path.suffix.lower() != ".csv" else "csv"
    return Source(kind=kind, path=text, units=[Unit(path.name, items, rows)],
                  fingerprint=_hash_files([path], content=True),
                  options={"image_column": image_column, "caption_column": caption_column},
                  has_poison_labels=poison_at is not None)


# ---- img2dataset `files` output ------------------------------------------------------------------------

def _img2dataset(text: str, folder: Path, parquets: list[Path], caption_column: str) -> Source:
    import pyarrow.parquet as pq

    units = []
    has_poison = False
    for parquet in parquets:
        try:
            schema = pq.read_schema(parquet)
            rows = pq.ParquetFile(parquet).metadata.num_rows
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise InputError(f"{parquet}: unreadable img2dataset shard table ({exc}); re-download that shard") from None
        missing = [c for c in ("key", "status") if c not in schema.names]
        if missing:
            raise InputError(f"{parquet}: no {' and '.join(missing)} column; expected img2dataset's shard table "
                             "(key, status, caption, url)")
        has_poison = has_poison or "is_poisoned" in schema.names
        units.append(Unit(parquet.stem, _shard_reader(parquet, folder / parquet.stem, caption_column, schema.names),
                          rows))
    return Source(kind="img2dataset", path=text, units=units, fingerprint=_hash_files(parquets, content=True),
                  options={"caption_column": caption_column}, has_poison_labels=has_poison)


def _shard_reader(parquet: Path, shard_dir: Path, caption_column: str, names: list[str]):
    def items(start: int) -> Iterator[Sample]:
        import pyarrow.parquet as pq

        wanted = [c for c in ("key", "status", caption_column, "url", "error_message", "is_poisoned") if c in names]
        table = pq.read_table(parquet, columns=wanted, use_threads=False).slice(start)
        files = {}
        if shard_dir.is_dir():
            for entry in os.scandir(shard_dir):
                stem, _, suffix = entry.name.partition(".")
                if suffix.lower() in IMAGE_SUFFIXES:
                    files.setdefault(stem, entry.path)
        columns = {name: table.column(name).to_pylist() for name in wanted}
        for i in range(table.num_rows):
            key = columns["key"][i]
            url = columns["url"][i] if "url" in columns else None
            poisoned = columns["is_poisoned"][i] if "is_poisoned" in columns else None
            status = columns["status"][i]
            if status != "success":
                detail = columns["error_message"][i] if "error_message" in columns else None
                yield Sample(key, url, None, is_poisoned=poisoned,
                             skip=("download failed", f"status {status}: {detail}" if detail else f"status {status}"))
                continue
            image = files.get(key)
            if image is None:
                yield Sample(key, url, None, is_poisoned=poisoned,
                             skip=("missing file", f"{shard_dir.name}/{key}.jpg (or .png/.webp) not found"))
                continue
            caption = columns[caption_column][i] if caption_column in columns else _read_text(shard_dir / f"{key}.txt")
            if not caption or not caption.strip():
                yield Sample(key, url, caption, is_poisoned=poisoned, skip=("no caption", f"{shard_dir.name}/{key}"))
                continue
            yield Sample(key, url, caption, image_path=image, is_poisoned=poisoned)

    return items


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


# ---- webdataset tar shards -----------------------------------------------------------------------------

def _webdataset(text: str, tars: list[Path]) -> Source:
    units = [Unit(tar.name, _tar_reader(tar), _expected_tar_samples(tar)) for tar in tars]
    return Source(kind="webdataset", path=text, units=units, fingerprint=_hash_files(tars, content=False))


def _expected_tar_samples(tar: Path) -> int | None:
    """img2dataset writes NNNNN.parquet beside NNNNN.tar; its successful rows are the tar's samples."""
    parquet = tar.with_name(tar.name.split(".")[0] + ".parquet")
    if not parquet.is_file():
        return None
    try:
        import pyarrow.parquet as pq

        status = pq.read_table(parquet, columns=["status"], use_threads=False).column("status").to_pylist()
    except Exception:  # only an estimate for the progress bar
        return None
    return sum(1 for s in status if s == "success")


def _tar_reader(tar: Path):
    def items(start: int) -> Iterator[Sample]:
        position = 0
        for sample in _tar_samples(tar, read=lambda: position >= start):
            if position >= start:
                yield sample
            position += 1

    return items


def _tar_samples(tar: Path, read: Callable[[], bool]) -> Iterator[Sample]:
    """Group consecutive members by key, streaming (no seeks, nothing unpacked); `read()` says whether the
    next sample's bytes are needed. A damaged shard ends with one skipped sample naming the shard."""
    group_key, members = None, {}
    try:
        with open(tar, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                match = _WDS_MEMBER.match(member.name)
                if match is None:
                    continue
                key, suffix = match.group(1), match.group(2).lower()
                if key != group_key:
                    if group_key is not None:
                        yield _tar_sample(tar, group_key, members)
                    group_key, members = key, {}
                    wanted = read()
                if wanted and suffix not in members and (suffix in IMAGE_SUFFIXES or suffix in CAPTION_SUFFIXES
                                                         or suffix == "json"):
                    members[suffix] = archive.extractfile(member).read()
                elif not wanted:
                    members.setdefault(suffix, b"")
            if group_key is not None:
                yield _tar_sample(tar, group_key, members)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        yield Sample(None, str(tar), None, skip=("bad shard", f"{tar.name}: {exc}; the shard ends here"))


def _tar_sample(tar: Path, key: str, members: dict[str, bytes]) -> Sample:
    meta = {}
    if members.get("json"):
        try:
            loaded = json.loads(members["json"])
            meta = loaded if isinstance(loaded, dict) else {}
        except (ValueError, UnicodeDecodeError):
            meta = {}
    source = meta.get("url") if isinstance(meta.get("url"), str) else f"{tar.name}/{key}"
    poisoned = meta.get("is_poisoned")
    poisoned = bool(poisoned) if isinstance(poisoned, (bool, int)) else None
    caption_bytes = next((members[s] for s in CAPTION_SUFFIXES if s in members), None)
    caption = caption_bytes.decode("utf-8", errors="replace") if caption_bytes is not None else None
    image = next((members[s] for s in IMAGE_SUFFIXES if s in members), None)
    if image is None:
        return Sample(key, source, caption, is_poisoned=poisoned, skip=("no image", f"{tar.name}: {key} has no image"))
    if not caption or not caption.strip():
        return Sample(key, source, caption, is_poisoned=poisoned, skip=("no caption", f"{tar.name}: {key}"))
    return Sample(key, source, caption, image_bytes=image, is_poisoned=poisoned)
