"""A scan's output folder read back for the report: summary.json, scores.parquet (one file, or a folder of parts),
and the scanned store or shard stores where they can still be found (captions, labels, caption vectors and image
files)."""
from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError

SCORE_COLUMNS = ("s_o", "s_g", "c", "posterior", "z", "score", "p_value")


@dataclass
class ScanOutputs:
    """What one scan published, and what the report can add from its store."""
    folder: Path
    summary: dict
    columns: dict  # scores.parquet as numpy arrays: row_id, key (object), the scores, subset/verdict (str), cluster
    store: object = None  # the scanned stores (a pipeline ChunkSource), or None when one is gone or changed
    notes: list = field(default_factory=list)  # what is left out of the report, and why
    labels: np.ndarray | None = None  # ground truth per row, when the store or the scan's labels file has it

    @property
    def rows(self) -> int:
        return len(self.columns["row_id"])

    @property
    def method(self) -> str:
        return self.summary["config"]["method"]

    @property
    def valid(self) -> np.ndarray:
        return self.columns["verdict"] != "invalid"

    def row_of(self, key: str) -> int:
        """The row of a source key (or of a row id, for a store without keys); InputError when absent."""
        import pyarrow as pa
        import pyarrow.compute as pc

        row = pc.index(pa.array(self.columns["key"], type=pa.string()), key).as_py()
        if row < 0:
            sample = ", ".join(repr(k) for k in self.columns["key"][:2])
            raise InputError(f"{self.folder / 'scores.parquet'}: no row has key {key!r} ({self.rows:,} rows; keys "
                             f"look like {sample})")
        return row

    def caption(self, row: int) -> str | None:
        return self._meta_value("caption", row)

    def _meta_value(self, column: str, row: int):
        if self.store is None or column not in self.store.meta.column_names:
            return None
        return self.store.meta.column(column)[int(row)].as_py()

    def text_vectors(self, rows) -> np.ndarray | None:
        """L2-normalised float32 caption vectors of `rows`, or None without the store."""
        if self.store is None:
            return None
        out = self.store.gather("text", np.asarray(rows, dtype=np.int64))
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1.0)

    def image_file(self, row: int) -> Path | None:
        """The row's image file, where the store's metadata names one that exists (see `_image_folders`)."""
        if self.store is None:
            return None
        for column in ("source", "key"):
            name = self._meta_value(column, row)
            if not name or "://" in name:
                continue
            path = Path(name)
            candidates = [path] if path.is_absolute() else [folder / path for folder in self._image_folders()]
            for candidate in candidates:
                if candidate.is_file():
                    return candidate
        return None

    def _image_folders(self) -> list[Path]:
        """Where a relative `source` or `key` is looked up: the working directory, the store's folder, and the
        folder of the CSV the store was embedded from."""
        folders = [Path.cwd(), self.store.path.parent]
        embed_input = (self.store.record.get("embed") or {}).get("input") or {}
        if embed_input.get("kind") in ("csv", "tsv") and embed_input.get("path"):
            csv_folder = Path(embed_input["path"]).parent
            folders += [csv_folder, self.store.path.parent / csv_folder]
        return folders

    def thumbnail(self, row: int, size: int = 96) -> str | None:
        """The row's image as a small JPEG data: URI, or None when it has no readable image file."""
        path = self.image_file(row)
        if path is None:
            return None
        try:
            from PIL import Image

            with Image.open(path) as image:
                image = image.convert("RGB")
                image.thumbnail((size, size))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=80)
        except (OSError, ValueError):
            return None
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def load(scan_dir: str | Path) -> ScanOutputs:
    """Read a scan's folder; open its stores when they are still where the scan found them and unchanged."""
    folder = Path(scan_dir)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder; give the --out folder of `cfbd-fast scan`")
    for name in ("summary.json", "scores.parquet"):
        if not (folder / name).exists():
            raise InputError(f"{folder}: no {name}, so not a scan's output folder; run `cfbd-fast scan STORE --out "
                             f"{folder}` first")
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except ValueError as exc:
        raise InputError(f"{folder / 'summary.json'}: not valid JSON ({exc}); run the scan again") from None
    if not isinstance(summary, dict) or not {"config", "store", "threshold"} <= set(summary):
        raise InputError(f"{folder / 'summary.json'}: not a scan's summary (no config, store or threshold); run the "
                         "scan again")
    table = read_table(folder / "scores.parquet")
    columns = {"row_id": table.column("row_id").to_numpy(),
               "key": table.column("key").to_numpy(zero_copy_only=False),
               "cluster": table.column("cluster").to_numpy().astype(np.int64)}
    for name in SCORE_COLUMNS:
        columns[name] = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
    for name in ("subset", "verdict"):
        columns[name] = table.column(name).cast("string").to_numpy()  # dictionary-encoded, per part
    out = ScanOutputs(folder=folder, summary=summary, columns=columns)
    out.store = _open_store(out)
    out.labels = _labels(out)
    return out


def read_table(path: Path):
    """A table the scan wrote: one parquet file, or a folder of parts read as one dataset in row order."""
    import pyarrow.dataset as ds

    try:
        table = ds.dataset(path, format="parquet").to_table()
        if table.num_rows and "row_id" in table.column_names:
            row_id = table.column("row_id").to_numpy()
            if np.any(np.diff(row_id) < 0):
                table = table.take(np.argsort(row_id, kind="stable"))
        return table
    except (OSError, ValueError) as exc:  # pyarrow's errors for unreadable parquet derive from these
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: cannot read it ({detail}); run the scan again") from None


def _open_store(out: ScanOutputs):
    """The scanned stores (the store, or every shard in order) as one reader, when each is where the scan found it
    and unchanged."""
    from ..pipeline.source import ChunkSource
    from ..store import EmbeddingStore

    recorded = out.summary.get("store", {})
    listed = recorded.get("shards") or [recorded]
    opened = []
    for entry in listed:
        path = Path(entry.get("path", ""))
        candidates = [path] if path.is_absolute() else [path, out.folder.parent / path, out.folder.parent / path.name]
        found = next((p for p in candidates if (p / "store.json").is_file()), None)
        if found is None:
            out.notes.append(f"the scanned store {path} is not found, so captions, labels, thumbnails and nearest "
                             "seed captions are left out (run the report where the scan ran)")
            break
        store = EmbeddingStore.open(found)
        opened.append(store)
        if store.fingerprint != entry.get("fingerprint"):
            out.notes.append(f"the store {found} changed since the scan (fingerprint {store.fingerprint}, the scan "
                             f"read {entry.get('fingerprint')}), so its captions, labels and images are left out")
            break
    else:
        if sum(len(s) for s in opened) == out.rows:
            return ChunkSource(opened)
        out.notes.append(f"the scanned stores hold {sum(len(s) for s in opened):,} rows, the scan {out.rows:,}, so "
                         "captions, labels and images are left out")
    for store in opened:
        store.close()
    return None


def _labels(out: ScanOutputs) -> np.ndarray | None:
    """Ground truth from the scan's labels file (when it is still there) or the store's is_poisoned column."""
    import pyarrow as pa

    from ..pipeline.source import read_labels

    labels_file = out.summary["config"].get("labels")
    if labels_file and Path(labels_file).is_file():
        return read_labels(labels_file, pa.array(list(out.columns["key"]), type=pa.string()))
    if out.store is None or "is_poisoned" not in out.store.meta.column_names:
        return None
    col = out.store.meta.column("is_poisoned")
    if col.null_count == len(col):
        return None
    return np.asarray(col.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
