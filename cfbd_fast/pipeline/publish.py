"""The scan's one writer: publishes a ScanResult's files into a folder, each complete or not at all.

scores.parquet (every row's scores), poisoned.txt / keep.txt / invalid.txt (source keys), keep.parquet (the kept
rows' metadata, every column the store has), flagged.csv (each flagged row's key, caption and scores, for a
person to read) and summary.json.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..errors import InputError

OUTPUT_FILES = ("scores.parquet", "poisoned.txt", "keep.txt", "invalid.txt", "keep.parquet", "flagged.csv",
                "summary.json")


def check_out_dir(out_dir: str | Path, force: bool = False) -> Path:
    """Refuse, before any work, an output path that is a file or a folder holding scan outputs (unless force)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file: give a folder for the scan's outputs")
    if out.is_dir() and not force and any((out / name).exists() for name in OUTPUT_FILES):
        raise InputError(f"--out {out} already holds scan outputs: pass --force to replace them or choose another "
                         "folder")
    if out.parent and not out.parent.exists():
        raise InputError(f"--out {out}: its parent folder {out.parent} does not exist")
    return out


def json_default(o):
    """`json.dumps(default=...)` for the numpy scalars and arrays in a summary."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_outputs(result, out_dir: str | Path) -> Path:
    """Publish `result` in `out_dir`: written under a temporary folder, fsynced, then renamed into place."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from .options import SUBSETS, VERDICTS

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".cfbd-scan-{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    table = pa.table({
        "row_id": result.row_id, "key": result.keys,
        "s_o": result.s_o, "s_g": result.s_g, "c": result.c, "posterior": result.posterior,
        "subset": pa.array(np.asarray(SUBSETS)[result.subset]).dictionary_encode(),
        "z": result.z, "score": result.score, "p_value": result.p_value, "cluster": result.cluster,
        "verdict": pa.array(np.asarray(VERDICTS)[result.verdict]).dictionary_encode(),
    })
    pq.write_table(table, tmp / "scores.parquet")
    for name, rows in (("poisoned.txt", result.poisoned_rows), ("keep.txt", result.kept_rows),
                       ("invalid.txt", result.invalid_rows)):
        with open(tmp / name, "w", encoding="utf-8") as fh:
            fh.writelines(f"{k}\n" for k in result.keys.take(rows).to_pylist())
    kept = pa.array(result.kept_rows)
    pq.write_table(result.meta.take(kept) if result.meta.num_columns else pa.table({"row_id": kept}),
                   tmp / "keep.parquet")
    flagged = pa.array(result.poisoned_rows)
    columns = {"row_id": flagged, "key": result.keys.take(flagged)}
    if "caption" in result.meta.column_names:
        columns["caption"] = result.meta.column("caption").take(flagged)
    for name in ("s_o", "c", "z", "score", "p_value", "cluster"):
        columns[name] = pa.array(getattr(result, name)[result.poisoned_rows])
    pacsv.write_csv(pa.table(columns), tmp / "flagged.csv")
    (tmp / "summary.json").write_text(json.dumps(result.summary, indent=2, default=json_default) + "\n")
    for f in sorted(tmp.iterdir()):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(f, out / f.name)
    tmp.rmdir()
    return out
