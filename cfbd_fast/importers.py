"""Build stores from what users already have: .npy matrices and clip-retrieval inference folders.

Both stream: sources are memory-mapped (np.load(mmap_mode="r")) and copied one batch at a time.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import InputError
from .locking import writer_lock
from .store import EmbeddingStore, write_batches

_KEY_COLUMNS = ("key", "image_path", "url")  # first one present becomes the store's `key`


def _rows(n: int) -> str:
    return f"{n:,} row" + ("" if n == 1 else "s")


def load_npy(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a 2-D .npy file; errors name the file."""
    path = Path(path)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path}: not a .npy file numpy can read ({exc})") from None
    if array.ndim != 2:
        raise InputError(f"{path}: expected a 2-D array (rows, dim), got shape {array.shape}")
    if array.dtype.kind != "f" and array.dtype.name != "bfloat16":
        raise InputError(f"{path}: expected floating-point embeddings, got dtype {array.dtype}")
    return array


def _meta_columns(parquet_file: Any, path: Path, need_caption: bool) -> dict[str, str]:
    """Map store column -> source column for a metadata parquet file."""
    names = parquet_file.schema_arrow.names
    columns = {}
    if "caption" in names:
        columns["caption"] = "caption"
    elif need_caption:
        raise InputError(f"{path}: no 'caption' column (found {', '.join(names)})")
    key = next((c for c in _KEY_COLUMNS if c in names), None)
    if key is not None:
        columns["key"] = key
    source = next((c for c in ("url", "image_path") if c in names and c != key), None)
    if source is not None:  # where the image came from (img2dataset re-downloads from the url)
        columns["source"] = source
    if "is_poisoned" in names:
        columns["is_poisoned"] = "is_poisoned"
    if "caption" not in columns and "key" not in columns:
        raise InputError(f"{path}: no 'caption' and no key column ({', '.join(_KEY_COLUMNS)}); found "
                         f"{', '.join(names) or 'no columns'}: add one, or leave out the metadata")
    return columns


def _write_new_store(out: str | os.PathLike, *args, **kwargs) -> EmbeddingStore:
    """`write_batches` into a new store; on any failure the partly written store is removed, so a rerun can start."""
    import shutil

    out = Path(out)
    existed = out.exists()
    if existed and not out.is_dir():
        raise InputError(f"{out} already exists; choose a new path or delete it")
    out.mkdir(parents=True, exist_ok=True)
    with writer_lock(out, "store"):  # held through the clean-up, so a failed import never removes another's store
        try:
            return write_batches(EmbeddingStore, out, *args, **kwargs)
        except BaseException:
            if not existed:
                shutil.rmtree(out, ignore_errors=True)
            raise


def _meta_batches(parquet_file: Any, columns: dict[str, str], offset: int, batch_rows: int) -> Iterator[tuple]:
    """(start, stop, table) batches of a parquet file, row positions shifted by `offset`."""
    import pyarrow as pa

    position = offset
    for batch in parquet_file.iter_batches(batch_size=batch_rows, columns=list(columns.values())):
        table = pa.table({ours: batch.column(theirs) for ours, theirs in columns.items()})
        yield position, position + table.num_rows, table
        position += table.num_rows


def _row_ranges(rows: int, batch_rows: int) -> Iterator[tuple]:
    for start in range(0, rows, batch_rows):
        yield start, min(start + batch_rows, rows), None


def from_npy(image_npy: str | os.PathLike, text_npy: str | os.PathLike, out: str | os.PathLike,
             meta_parquet: str | os.PathLike | None = None, model: str | None = None, pretrained: str | None = None,
             normalized: bool | None = None, dtype: Any = None, batch_rows: int = 65536,
             progress: bool = True) -> EmbeddingStore:
    """Write IMAGE.npy and TEXT.npy (row-aligned, same shape) and optional metadata parquet (`caption` and one of
    `key`/`image_path`/`url`, optional `is_poisoned`) to a new store OUT. Returns it opened read-only."""
    image, text = load_npy(image_npy), load_npy(text_npy)
    if image.shape != text.shape:
        raise InputError(f"{text_npy}: shape {text.shape} differs from {image_npy}'s {image.shape}; "
                         "rows must be aligned pairs")
    rows = image.shape[0]
    batches: Iterator[tuple] = _row_ranges(rows, batch_rows)
    if meta_parquet is not None:
        meta_path = Path(meta_parquet)
        parquet_file = _parquet_file(meta_path)
        if parquet_file.metadata.num_rows != rows:
            raise InputError(f"{meta_path}: {_rows(parquet_file.metadata.num_rows)}, the embeddings have {_rows(rows)}")
        batches = _meta_batches(parquet_file, _meta_columns(parquet_file, meta_path, need_caption=False), 0,
                                batch_rows)
    return _write_new_store(out, {"image": image, "text": text}, batches, rows=rows, dtype=dtype, model=model,
                         pretrained=pretrained, normalized=normalized, progress=progress,
                         description="importing .npy")


def _parquet_file(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a parquet file pyarrow can read ({exc})") from None


def _numbered(folder: Path, prefix: str, suffix: str) -> dict[int, Path]:
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d+){re.escape(suffix)}$")
    found = {}
    for entry in folder.iterdir() if folder.is_dir() else ():
        match = pattern.match(entry.name)
        if match:
            found[int(match.group(1))] = entry
    return found


def import_clip_retrieval(src: str | os.PathLike, out: str | os.PathLike, model: str | None = None,
                          pretrained: str | None = None, normalized: bool | None = None, dtype: Any = None,
                          batch_rows: int = 65536, progress: bool = True) -> EmbeddingStore:
    """Import a clip-retrieval inference folder (img_emb/img_emb_{i}.npy, text_emb/text_emb_{i}.npy,
    metadata/metadata_{i}.parquet; partitions in numeric order) into a new store OUT.

    Metadata `caption` becomes `caption`, `image_path` (or `url`) becomes `key`. Returns the store opened read-only.
    """
    src = Path(src)
    if not src.is_dir():
        raise InputError(f"{src}: not a clip-retrieval output folder (expected a directory with img_emb/, "
                         "text_emb/, metadata/)")
    images = _numbered(src / "img_emb", "img_emb", ".npy")
    texts = _numbered(src / "text_emb", "text_emb", ".npy")
    metas = _numbered(src / "metadata", "metadata", ".parquet")
    if not images:
        raise InputError(f"{src / 'img_emb'}: no img_emb_<i>.npy files; is {src} a clip-retrieval output folder?")
    for index in sorted(set(images) | set(texts) | set(metas)):
        for found, folder, name in ((images, "img_emb", f"img_emb_{index}.npy"),
                                    (texts, "text_emb", f"text_emb_{index}.npy"),
                                    (metas, "metadata", f"metadata_{index}.parquet")):
            if index not in found:
                raise InputError(f"{src / folder / name}: missing; partition {index} needs image, text and metadata")

    partitions = []
    dim = None
    total = 0
    for index in sorted(images):
        image, text = load_npy(images[index]), load_npy(texts[index])
        parquet_file = _parquet_file(metas[index])
        if text.shape != image.shape:
            raise InputError(f"{texts[index]}: shape {text.shape} differs from {images[index].name}'s {image.shape}")
        if parquet_file.metadata.num_rows != image.shape[0]:
            raise InputError(f"{metas[index]}: {_rows(parquet_file.metadata.num_rows)}, {images[index].name} has "
                             f"{_rows(image.shape[0])}")
        if dim is not None and image.shape[1] != dim:
            raise InputError(f"{images[index]}: dim {image.shape[1]}, earlier partitions have {dim}")
        dim = image.shape[1]
        columns = _meta_columns(parquet_file, metas[index], need_caption=True)
        partitions.append((image, text, parquet_file, columns, total))
        total += image.shape[0]

    sources = {"image": _Concatenated([p[0] for p in partitions]), "text": _Concatenated([p[1] for p in partitions])}

    def batches() -> Iterator[tuple]:
        for _, _, parquet_file, columns, offset in partitions:
            yield from _meta_batches(parquet_file, columns, offset, batch_rows)

    return _write_new_store(out, sources, batches(), rows=total, dtype=dtype, model=model, pretrained=pretrained,
                         normalized=normalized, progress=progress, description="importing clip-retrieval")


class _Concatenated:
    """Row-wise concatenation of memory-mapped partitions, sliced without copying more than one batch.

    Slices never cross a partition boundary here because batches come from one partition's metadata.
    """

    def __init__(self, parts: list[np.ndarray]):
        self._parts = parts
        self._starts = np.cumsum([0] + [p.shape[0] for p in parts])
        self.shape = (int(self._starts[-1]), parts[0].shape[1])
        self.dtype = parts[0].dtype
        self.ndim = 2

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop = rows.start, rows.stop
        index = int(np.searchsorted(self._starts, start, side="right")) - 1
        base = self._starts[index]
        if stop > self._starts[index + 1]:
            raise IndexError("a batch may not cross partitions")
        return self._parts[index][start - base:stop - base]
