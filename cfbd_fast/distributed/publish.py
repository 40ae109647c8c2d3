"""The sharded scan's writer: every rank writes its rows' parts into one hidden temporary folder under --out (a
folder all ranks share), rank 0 joins them in global row order into the files a single process writes, and
publishes them by rename, summary.json last. A failed or killed run leaves no published output.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..pipeline.options import SUBSETS, V_BENIGN, V_INVALID, V_POISONED, VERDICTS
from ..pipeline.publish import json_default
from .comm import Comm

TEXT_LISTS = (("poisoned.txt", V_POISONED), ("keep.txt", V_BENIGN), ("invalid.txt", V_INVALID))


def publish(comm: Comm, part, s, summary: dict, out: str | Path) -> Path:
    out = Path(out)
    token = comm.gather_objects(uuid.uuid4().hex[:12] if comm.is_root else None, "name the output folder")[0]
    tmp = out / f".cfbd-scan-{token}.tmp"
    try:
        if comm.is_root:
            out.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        comm.barrier("create the output folder")
        if not tmp.is_dir():
            raise InputError(f"--out {out}: rank {comm.rank} cannot see {tmp.name}: give an --out folder on a "
                             "filesystem every rank shares")
        for seg in part.segments:
            _write_segment(tmp, seg, part, s)
        starts = sorted(g for rank in comm.gather_objects([seg.global_start for seg in part.segments],
                                                          "list the parts") for g in rank)
        if comm.is_root:
            _join(tmp, [f"{g:015d}" for g in starts], summary)
            for f in sorted((tmp / "final").iterdir()):
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(f, out / f.name)
            shutil.rmtree(tmp)
        comm.barrier("publish")
    except BaseException:
        if comm.is_root:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_segment(tmp: Path, seg, part, s) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = f"{seg.global_start:015d}"
    lo, n = seg.local_start, len(seg)
    sl = slice(lo, lo + n)
    row_id = np.arange(seg.global_start, seg.global_start + n, dtype=np.int64)
    keys = part.keys.slice(lo, n)
    verdict = s.verdict[sl]
    table = pa.table({
        "row_id": row_id, "key": keys,
        "s_o": s.s_o[sl], "s_g": s.s_g[sl], "c": s.c[sl], "posterior": s.posterior[sl],
        "subset": pa.array(np.asarray(SUBSETS)[s.subset[sl]]).dictionary_encode(),
        "z": s.z[sl], "score": s.score[sl], "p_value": s.p_value[sl], "cluster": s.cluster[sl],
        "verdict": pa.array(np.asarray(VERDICTS)[verdict]).dictionary_encode(),
    })
    pq.write_table(table, tmp / f"scores.{name}.parquet")
    for file, code in TEXT_LISTS:
        with open(tmp / f"{file}.{name}", "w", encoding="utf-8") as fh:
            fh.writelines(f"{k}\n" for k in keys.take(np.flatnonzero(verdict == code)).to_pylist())
    meta = part.meta.slice(lo, n)
    if "row_id" in meta.column_names:  # a shard numbers its own rows: give them their global ids
        meta = meta.set_column(meta.column_names.index("row_id"), "row_id", pa.array(row_id))
    kept = np.flatnonzero(verdict == V_BENIGN)
    pq.write_table(meta.take(kept) if meta.num_columns else pa.table({"row_id": row_id[kept]}),
                   tmp / f"keep.{name}.parquet")
    flagged = np.flatnonzero(verdict == V_POISONED)
    columns = {"row_id": pa.array(row_id[flagged]), "key": keys.take(flagged)}
    if "caption" in meta.column_names:
        columns["caption"] = meta.column("caption").take(flagged)
    for col in ("s_o", "c", "z", "score", "p_value", "cluster"):
        columns[col] = pa.array(getattr(s, col)[sl][flagged])
    pq.write_table(pa.table(columns), tmp / f"flagged.{name}.parquet")


def _join(tmp: Path, names: list[str], summary: dict) -> None:
    """The whole-dataset files from the parts, in global row order, under tmp/final."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    final = tmp / "final"
    final.mkdir()
    for stem in ("scores", "keep"):
        parts = [tmp / f"{stem}.{name}.parquet" for name in names]
        missing = [p.name for p in parts if not p.is_file()]
        if missing:
            raise InputError(f"parts {', '.join(missing[:3])} are missing under {tmp}: every rank must write to an "
                             "--out folder on a shared filesystem")
        writer = None
        for p in parts:
            pf = pq.ParquetFile(p)
            if writer is None:
                writer = pq.ParquetWriter(final / f"{stem}.parquet", pf.schema_arrow)
            for batch in pf.iter_batches():
                writer.write_table(pa.Table.from_batches([batch]).cast(writer.schema))
        writer.close()
    for file, _ in TEXT_LISTS:
        with open(final / file, "wb") as dst:
            for name in names:
                with open(tmp / f"{file}.{name}", "rb") as src:
                    shutil.copyfileobj(src, dst)
    flagged = pa.concat_tables([pq.read_table(tmp / f"flagged.{name}.parquet") for name in names])
    pacsv.write_csv(flagged, final / "flagged.csv")
    (final / "summary.json").write_text(json.dumps(summary, indent=2, default=json_default) + "\n")
