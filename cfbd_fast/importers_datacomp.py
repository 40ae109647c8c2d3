"""Build a store from a DataComp-style pool: per shard, NNNNNNNN.npz of precomputed CLIP features (arrays such as
`l14_img` and `l14_txt`) beside NNNNNNNN.parquet metadata (`uid`, `text`, `url`), row-aligned.

Every shard is checked before anything is written (pairs present, feature arrays present, dimension, row counts,
uids of 32 hex digits and unique over the pool); the uid becomes the store's row key, so that `cfbd-fast filter`
writes DataComp's own subset file. Features stream one shard at a time.
"""
from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import InputError
from .importers import _meta_batches, _parquet_file, _rows, _write_new_store

_UID = re.compile(r"^[0-9a-fA-F]{32}$")
CAPTION_COLUMNS = ("text", "caption")


@dataclass
class _Shard:
    npz: Path
    parquet: Path
    rows: int
    columns: dict  # store column -> metadata column


def _npz_header(npz: Path, name: str) -> tuple[tuple, np.dtype]:
    """Shape and dtype of array NAME in an .npz, read from its header alone."""
    try:
        with zipfile.ZipFile(npz) as archive:
            members = {m[:-4] for m in archive.namelist() if m.endswith(".npy")}
            if name not in members:
                raise InputError(f"{npz}: no {name!r} array (it holds {', '.join(sorted(members)) or 'none'}); "
                                 "choose --features among the prefixes present")
            with archive.open(name + ".npy") as fh:
                version = np.lib.format.read_magic(fh)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = read(fh)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InputError(f"{npz}: not an .npz file numpy can read ({exc}); re-download that shard") from None
    if len(shape) != 2 or dtype.kind != "f":
        raise InputError(f"{npz}: {name} has shape {shape} and dtype {dtype}; expected 2-D floating-point features")
    return shape, dtype


def _shard_columns(parquet_file: Any, path: Path) -> dict:
    names = parquet_file.schema_arrow.names
    if "uid" not in names:
        raise InputError(f"{path}: no uid column (found {', '.join(names)}); expected DataComp metadata")
    caption = next((c for c in CAPTION_COLUMNS if c in names), None)
    if caption is None:
        raise InputError(f"{path}: no text or caption column (found {', '.join(names)})")
    columns = {"key": "uid", "caption": caption}
    if "url" in names:
        columns["source"] = "url"
    return columns


def _pairs(src: Path) -> list[tuple[Path, Path]]:
    if not src.is_dir():
        raise InputError(f"{src}: not a folder; give the folder of NNNNNNNN.npz and NNNNNNNN.parquet shards")
    npzs = {p.stem: p for p in src.glob("*.npz")}
    parquets = {p.stem: p for p in src.glob("*.parquet")}
    if not npzs:
        raise InputError(f"{src}: no .npz feature shards; is this a DataComp metadata folder with features?")
    for stem in sorted(set(npzs) ^ set(parquets)):
        missing = src / (f"{stem}.parquet" if stem in npzs else f"{stem}.npz")
        raise InputError(f"{missing}: missing; every shard needs its .npz features and its .parquet metadata")
    return [(npzs[s], parquets[s]) for s in sorted(npzs)]


def _check_uids(shards: list[_Shard]) -> None:
    """Every uid is 32 hex digits and appears once in the pool; errors name the shard."""
    import pyarrow.parquet as pq

    seen: dict[str, Path] = {}
    for shard in shards:
        for uid in pq.read_table(shard.parquet, columns=["uid"], use_threads=False).column("uid").to_pylist():
            if not isinstance(uid, str) or _UID.match(uid) is None:
                raise InputError(f"{shard.parquet}: uid {uid!r} is not 32 hexadecimal digits")
            earlier = seen.get(uid.lower())
            if earlier is not None:
                where = "twice in this shard" if earlier is shard.parquet else f"also in {earlier.name}"
                raise InputError(f"{shard.parquet}: uid {uid} appears {where}; a pool's uids must be unique")
            seen[uid.lower()] = shard.parquet


class _ShardFeatures:
    """One feature array over all shards, loaded a shard at a time; slices never cross shards."""

    def __init__(self, shards: list[_Shard], name: str, dim: int, dtype: np.dtype):
        self._shards, self._name = shards, name
        self._starts = np.cumsum([0] + [s.rows for s in shards])
        self.shape, self.dtype, self.ndim = (int(self._starts[-1]), dim), dtype, 2
        self._loaded: tuple[int, np.ndarray] | None = None

    def __getitem__(self, rows: slice) -> np.ndarray:
        index = int(np.searchsorted(self._starts, rows.start, side="right")) - 1
        if self._loaded is None or self._loaded[0] != index:
            with np.load(self._shards[index].npz, allow_pickle=False) as npz:
                self._loaded = index, npz[self._name]
        base = self._starts[index]
        return self._loaded[1][rows.start - base:rows.stop - base]


def import_datacomp(src: str | os.PathLike, out: str | os.PathLike, features: str = "l14",
                    model: str | None = None, pretrained: str | None = None, normalized: bool | None = None,
                    dtype: Any = None, batch_rows: int = 65536, progress: bool = True):
    """Import the DataComp-style pool in SRC (FEATURES_img / FEATURES_txt arrays) into a new store OUT, keyed by
    uid, with the caption (`text`) and `url` as source. Returns the store opened read-only."""
    src = Path(src)
    image_name, text_name = f"{features}_img", f"{features}_txt"
    shards: list[_Shard] = []
    dim = None
    for npz, parquet in _pairs(src):
        (image_shape, image_dtype), (text_shape, _) = _npz_header(npz, image_name), _npz_header(npz, text_name)
        if image_shape != text_shape:
            raise InputError(f"{npz}: {text_name} has shape {text_shape}, {image_name} {image_shape}; rows must be "
                             "aligned pairs")
        if dim is not None and image_shape[1] != dim:
            raise InputError(f"{npz}: {image_name} has dim {image_shape[1]}, earlier shards have {dim}")
        if dim is None:
            dim, first_dtype = image_shape[1], image_dtype
        parquet_file = _parquet_file(parquet)
        if parquet_file.metadata.num_rows != image_shape[0]:
            raise InputError(f"{parquet}: {_rows(parquet_file.metadata.num_rows)}, {npz.name} has "
                             f"{_rows(image_shape[0])}")
        shards.append(_Shard(npz, parquet, image_shape[0], _shard_columns(parquet_file, parquet)))
    _check_uids(shards)
    total = sum(s.rows for s in shards)
    arrays = {"image": _ShardFeatures(shards, image_name, dim, first_dtype),
              "text": _ShardFeatures(shards, text_name, dim, first_dtype)}

    def batches() -> Iterator[tuple]:
        offset = 0
        for shard in shards:
            yield from _meta_batches(_parquet_file(shard.parquet), shard.columns, offset, batch_rows)
            offset += shard.rows

    return _write_new_store(out, arrays, batches(), rows=total, dtype=dtype, model=model, pretrained=pretrained,
                            normalized=normalized, progress=progress, description="importing DataComp shards")
