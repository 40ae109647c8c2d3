"""One writer per dataset format: the filtered copy of a CSV/TSV table, an img2dataset folder, webdataset .tar
shards, and the sorted uid list of a DataComp-style pool. Keys are named as `cfbd-fast embed` names them.

Each writer streams one input shard into a temporary output and returns its counts; FilterOutput publishes it.
"""
from __future__ import annotations

import csv
import mmap
import os
import re
import shutil
import sys
import tarfile
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np

from ..errors import InputError
from .output import FilterOutput, link_or_copy

# webdataset's rule, as `cfbd-fast embed` reads shards (embed/sources.py, not imported: it brings torch): the key
# is the member path up to the first dot of its file name
_WDS_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
# choose(key, where) -> whether the row is written; raises InputError for a key the scan does not know (unless
# told to keep those); choose.unknown says whether the last key was one
Choose = Callable[[str | None, str], bool]


class Counts(dict):
    """A shard's rows: read, written, not written, and of those written or not, how many the scan never saw."""

    def __init__(self):
        super().__init__(rows=0, written=0, dropped=0, unknown=0)

    def add(self, chosen: bool, unknown: bool = False) -> None:
        self["rows"] += 1
        self["written" if chosen else "dropped"] += 1
        self["unknown"] += bool(unknown)


# ---- CSV / TSV -----------------------------------------------------------------------------------------

def _raw_rows(path: Path) -> Iterator[tuple[list[str], str]]:
    """(parsed row, its exact text) for each record, quoted newlines included: csv pulls lines one record at a time."""
    csv.field_size_limit(min(sys.maxsize, 1 << 30))
    consumed: list[str] = []
    with open(path, newline="", encoding="utf-8") as fh:
        def lines():
            for line in fh:
                consumed.append(line)
                yield line

        delimiter = "," if path.suffix.lower() == ".csv" else "\t"
        for row in csv.reader(lines(), delimiter=delimiter):
            text = "".join(consumed)
            consumed.clear()
            yield row, text


def filter_table(path: Path, out: FilterOutput, choose: Choose, image_column: str, bar) -> dict:
    """Rows of the table kept byte for byte (header first); each written row's image file, when it is a relative
    path inside the table's folder, linked (or copied) to the same relative path under OUT."""
    name = path.name
    if (done := out.done(name)) is not None:
        bar.advance(done["rows"])
        return done
    counts = Counts()
    tmp_table, tmp_images = out.tmp(name), out.tmp(name + ".images")
    rows = _raw_rows(path)
    header, header_text = next(rows, ([], ""))
    columns = [c.strip().lstrip("\ufeff") for c in header]
    if image_column not in columns:
        raise InputError(f"{path}: no image column {image_column!r} (columns: {', '.join(columns)}); name it with "
                         "--image-column")
    at = columns.index(image_column)
    folder = path.parent.resolve()
    images = []
    with open(tmp_table, "w", encoding="utf-8", newline="") as dst:
        dst.write(header_text)
        for line, (row, text) in enumerate(rows):
            image = row[at].strip() if at < len(row) else ""
            chosen = choose(image or None, f"{path} row {line + 2}")
            counts.add(chosen, choose.unknown)
            bar.advance(1)
            if not chosen:
                continue
            dst.write(text)
            inside = (folder / image).resolve()
            if not os.path.isabs(image) and inside.is_relative_to(folder) and inside.is_file():
                images.append(image)
    for image in images:
        link_or_copy(folder / image, tmp_images / image)
    moves = [(p, str(p.relative_to(tmp_images))) for p in sorted(tmp_images.rglob("*")) if p.is_file()] \
        if tmp_images.is_dir() else []
    for tmp, final in moves:  # images first, the table last: a published table has its images
        (out.path / final).parent.mkdir(parents=True, exist_ok=True)
    out.publish(name, counts, moves + [(tmp_table, name)])
    if tmp_images.is_dir():
        shutil.rmtree(tmp_images)
    return counts


# ---- img2dataset ---------------------------------------------------------------------------------------

def _filtered_parquet(parquet: Path, chosen_keys: set | None, choose: Choose | None, counts: Counts | None):
    """PARQUET's successfully downloaded rows that are written; rows of other status are no samples and go."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(parquet, use_threads=False)
    if "key" not in table.column_names:
        raise InputError(f"{parquet}: no key column; expected img2dataset's shard table (key, status, caption, url)")
    keys = table.column("key").to_pylist()
    status = table.column("status").to_pylist() if "status" in table.column_names else ["success"] * len(keys)
    mask = []
    for key, state in zip(keys, status):
        if state != "success":
            mask.append(False)
            continue
        chosen = key in chosen_keys if chosen_keys is not None else choose(key, f"{parquet} key {key}")
        if counts is not None:
            counts.add(chosen, choose.unknown)
        mask.append(chosen)
    return table.filter(pa.array(mask, pa.bool_()))


def filter_img2dataset_shard(parquet: Path, out: FilterOutput, choose: Choose, bar) -> dict:
    """NNNNN.parquet (written rows) and NNNNN/ (every file of each written key: image, .txt, .json)."""
    import pyarrow.parquet as pq

    stem = parquet.stem
    if (done := out.done(stem)) is not None:
        bar.advance(done["rows"])
        return done
    counts = Counts()
    table = _filtered_parquet(parquet, None, choose, counts)
    bar.advance(counts["rows"])
    written = set(table.column("key").to_pylist())
    shard_dir, tmp_dir, tmp_parquet = parquet.with_suffix(""), out.tmp(stem), out.tmp(stem + ".parquet")
    tmp_dir.mkdir()
    if shard_dir.is_dir():
        for entry in os.scandir(shard_dir):
            if entry.name.partition(".")[0] in written and entry.is_file():
                link_or_copy(entry.path, tmp_dir / entry.name)
    pq.write_table(table, tmp_parquet)
    out.publish(stem, counts, [(tmp_dir, stem), (tmp_parquet, stem + ".parquet")])
    return counts


# ---- webdataset ----------------------------------------------------------------------------------------

def filter_tar(tar: Path, out: FilterOutput, choose: Choose, bar) -> dict:
    """The shard's members of written keys, in order and byte for byte, into a shard of the same name; the
    img2dataset table beside it (NNNNN.parquet), when there is one, filtered to the same keys."""
    import pyarrow.parquet as pq

    name = tar.name
    if (done := out.done(name)) is not None:
        bar.advance(done["rows"])
        return done
    counts, written = Counts(), set()
    tmp = out.tmp(name)
    try:
        if name.lower().endswith((".tar.gz", ".tgz")):
            _filter_tar_stream(tar, tmp, choose, counts, written, bar)
        else:
            _filter_tar_ranges(tar, tmp, choose, counts, written, bar)
    except (tarfile.TarError, EOFError) as exc:
        raise InputError(f"{tar}: unreadable tar shard ({exc}); re-download or remove it") from None
    moves = [(tmp, name)]
    parquet = tar.with_name(name.split(".")[0] + ".parquet")
    if parquet.is_file():
        tmp_parquet = out.tmp(parquet.name)
        pq.write_table(_filtered_parquet(parquet, written, None, None), tmp_parquet)
        moves.insert(0, (tmp_parquet, parquet.name))
    out.publish(name, counts, moves)
    return counts


def _members_by_key(members, tar: Path, choose: Choose, counts: Counts, written: set, bar):
    """(member, chosen) for each sample member, deciding each key once, at its first member."""
    group, chosen = None, False
    for member in members:
        match = _WDS_MEMBER.match(member.name) if member.isfile() else None
        if match is None:
            continue
        if match.group(1) != group:
            group = match.group(1)
            chosen = choose(group, f"{tar} key {group}")
            counts.add(chosen, choose.unknown)
            bar.advance(1)
            if chosen:
                written.add(group)
        yield member, chosen


class _Member(NamedTuple):
    name: str
    offset: int  # first header block (extended headers included)
    offset_data: int
    size: int
    regular: bool

    def isfile(self) -> bool:
        return self.regular


def _octal(field: bytes) -> int:
    if field[:1] == b"\x80":  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _tar_members(path: Path) -> list[_Member]:
    """The members of an uncompressed tar from its headers alone (ustar, GNU long names, pax path and size),
    read through a memory map. Raises tarfile.ReadError on a header it does not know (the caller then asks
    tarfile)."""
    members, pending, extended_at = [], {}, None
    empty = b"\0" * tarfile.BLOCKSIZE
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as view:
        offset, end = 0, len(view)
        while True:
            header = view[offset:offset + tarfile.BLOCKSIZE]
            if len(header) < tarfile.BLOCKSIZE or header == empty:
                return members
            if header[257:262] != b"ustar":  # ustar, GNU and pax headers carry it; older tars go to tarfile
                raise tarfile.ReadError(f"no ustar header at byte {offset}")
            kind, size = header[156:157], _octal(header[124:136])
            data = offset + tarfile.BLOCKSIZE
            if data + size > end:
                raise tarfile.ReadError(f"the member at byte {offset} runs past the end of the file")
            if kind in (b"x", b"L"):  # extended header of the next member: its bytes travel with it
                body = view[data:data + size]
                if kind == b"L":
                    pending["path"] = body.rstrip(b"\0").decode("utf-8", "surrogateescape")
                else:
                    pending.update(_pax_records(body))
                extended_at = offset if extended_at is None else extended_at
            elif kind != b"g":  # a global pax header belongs to no member
                name = pending.get("path")
                if name is None:
                    raw = header[:100].split(b"\0", 1)[0]
                    if header[257:263] == b"ustar\0" and header[345:346] != b"\0":  # POSIX prefix field
                        raw = header[345:500].split(b"\0", 1)[0] + b"/" + raw
                    name = raw.decode("utf-8", "surrogateescape")
                size = int(pending.get("size", size))
                first = offset if extended_at is None else extended_at
                name = name.rstrip("/") if kind == b"5" else name  # a folder, named as tarfile names it
                members.append(_Member(name, first, data, size, kind in (b"0", b"\0", b"7")))
                pending, extended_at = {}, None
            offset = data + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _pax_records(body: bytes) -> dict:
    """path and size of a pax extended header ("LEN key=value\n" records)."""
    out, at = {}, 0
    while at < len(body) and body[at:at + 1] != b"\0":
        length = int(body[at:body.index(b" ", at)])
        key, _, value = body[body.index(b" ", at) + 1:at + length - 1].partition(b"=")
        if key in (b"path", b"size"):
            out[key.decode()] = value.decode("utf-8", "surrogateescape")
        at += length
    return out


def _filter_tar_ranges(tar: Path, tmp: Path, choose: Choose, counts: Counts, written: set, bar) -> None:
    """An uncompressed shard: headers read once, then each run of written members copied as raw bytes (headers
    and extended headers included), in the kernel where it can (copy_file_range)."""
    try:
        members = _tar_members(tar)
    except (tarfile.ReadError, ValueError):  # a header the fast reader does not know: tarfile reads them all
        with tarfile.open(tar, "r:") as archive:
            members = archive.getmembers()
    ranges: list[list[int]] = []
    for member, chosen in _members_by_key(members, tar, choose, counts, written, bar):
        if not chosen:
            continue
        end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        if ranges and ranges[-1][1] == member.offset:
            ranges[-1][1] = end
        else:
            ranges.append([member.offset, end])
    with open(tar, "rb") as src, open(tmp, "wb") as dst:
        for start, end in ranges:
            _copy_range(src, dst, start, end - start)
        size = dst.tell() + 2 * tarfile.BLOCKSIZE  # end-of-archive: two zero blocks, padded to a whole record
        dst.write(b"\0" * (2 * tarfile.BLOCKSIZE + (-size % tarfile.RECORDSIZE)))


def _copy_range(src, dst, offset: int, length: int) -> None:
    dst.flush()
    while length > 0:
        try:
            done = os.copy_file_range(src.fileno(), dst.fileno(), length, offset)
        except OSError:  # another filesystem, or no copy_file_range: copy through memory
            done = 0
        if done == 0:
            src.seek(offset)
            data = src.read(min(length, 1 << 24))
            if not data:
                raise EOFError(f"the shard ends before byte {offset + length}")
            dst.write(data)
            dst.flush()
            done = len(data)
        offset += done
        length -= done


def _filter_tar_stream(tar: Path, tmp: Path, choose: Choose, counts: Counts, written: set, bar) -> None:
    """A compressed shard, streamed: written members re-packed with their own headers' fields."""
    with open(tar, "rb") as src, tarfile.open(fileobj=src, mode="r|*") as archive, \
            open(tmp, "wb") as raw, tarfile.open(fileobj=raw, mode="w|gz", format=tarfile.PAX_FORMAT) as dst:
        for member, chosen in _members_by_key(archive, tar, choose, counts, written, bar):
            if chosen:
                dst.addfile(member, archive.extractfile(member))


# ---- DataComp-style uid lists --------------------------------------------------------------------------

UID_DTYPE = np.dtype("<u8,<u8")  # fields f0 (high 64 bits), f1 (low), as DataComp writes them


def uids_to_array(uids: list[str], where: str) -> np.ndarray:
    """128-bit hex uids as DataComp stores them in a subset file: (high, low) little-endian uint64 pairs."""
    out = np.empty(len(uids), dtype=UID_DTYPE)
    for i, uid in enumerate(uids):
        if not isinstance(uid, str) or len(uid) != 32:
            raise InputError(f"{where}: uid {uid!r} is not 32 hexadecimal digits")
        try:
            out[i] = (int(uid[:16], 16), int(uid[16:], 16))
        except ValueError:
            raise InputError(f"{where}: uid {uid!r} is not 32 hexadecimal digits") from None
    return out


def filter_datacomp(parquets: list[Path], out: FilterOutput, choose: Choose, bar) -> dict:
    """OUT/uids.npy: the written uids of every shard table, sorted, as DataComp's resharder reads a subset."""
    import pyarrow.parquet as pq

    counts, chosen_uids = Counts(), []
    for parquet in parquets:
        try:
            uids = pq.read_table(parquet, columns=["uid"], use_threads=False).column("uid").to_pylist()
        except KeyError:
            raise InputError(f"{parquet}: no uid column; expected DataComp metadata (uid, url, text)") from None
        for uid in uids:
            chosen = choose(uid, f"{parquet} uid {uid}")
            counts.add(chosen, choose.unknown)
            if chosen:
                chosen_uids.append(uid)
        bar.advance(len(uids))
    array = np.sort(uids_to_array(chosen_uids, str(parquets[0].parent)))
    tmp = out.tmp("uids.npy")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
    out.publish("uids.npy", counts, [(tmp, "uids.npy")])
    return counts
