"""`cfbd-fast filter`: a scan's verdict applied to the dataset it came from, written as a cleaned copy in the
dataset's own format (a table, an img2dataset folder, webdataset shards, or a DataComp uid list)."""
from __future__ import annotations

import glob as globlib
import os
from pathlib import Path

from ..errors import InputError
from ..progress import progress_bar
from . import formats
from .output import FilterOutput
from .verdict import DROP, KEEP, Verdict, load_verdict

FORMATS = ("auto", "table", "img2dataset", "webdataset", "datacomp-uids")
__all__ = ["FORMATS", "KEEP", "DROP", "filter_dataset", "detect"]


def _is_tar(name: str) -> bool:
    return name.lower().endswith((".tar", ".tar.gz", ".tgz"))


def detect(data: str | os.PathLike, data_format: str = "auto") -> tuple[str, list[Path]]:
    """(format, input files in order): the table, the img2dataset shard tables, the .tar shards or the DataComp
    metadata tables of DATA."""
    text = os.fspath(data)
    path = Path(text)
    found: tuple[str, list[Path]] | None = None
    if not path.exists() and any(ch in text for ch in "*?["):
        found = "webdataset", sorted(Path(p) for p in globlib.glob(text) if _is_tar(p))
    elif not path.exists():
        raise InputError(f"{text}: no such file or folder; give the dataset the scanned store was embedded from")
    elif path.is_file():
        if _is_tar(path.name):
            found = "webdataset", [path]
        elif path.suffix.lower() in (".csv", ".tsv", ".txt"):
            found = "table", [path]
    else:
        parquets = sorted(path.glob("*.parquet"))
        tars = sorted(p for p in path.iterdir() if p.is_file() and _is_tar(p.name))
        if data_format == "datacomp-uids" or any(p.with_suffix(".npz").is_file() for p in parquets):
            found = "datacomp-uids", parquets
        elif tars:
            found = "webdataset", tars
        elif any(p.with_suffix("").is_dir() for p in parquets):
            found = "img2dataset", [p for p in parquets if p.with_suffix("").is_dir()]
        elif (path / "data.csv").is_file():
            found = "table", [path / "data.csv"]
    if found is None or not found[1]:
        raise InputError(f"{text}: found no CSV/TSV table, img2dataset shards (NNNNN.parquet beside NNNNN/), .tar "
                         "shards or DataComp metadata (NNNNN.parquet beside NNNNN.npz); point filter at the data the "
                         "store was embedded from")
    if data_format not in ("auto", found[0]):
        raise InputError(f"{text}: holds {found[0]} data, not {data_format}; leave out --format or fix the path")
    return found


class _Chooser:
    """Decides each row by the verdict; `unknown` tells whether the last key was one the scan never saw."""

    def __init__(self, verdict: Verdict, scan_dir: Path, mode: str, keep_unknown: bool):
        self.verdict, self.scan_dir, self.mode, self.keep_unknown = verdict, scan_dir, mode, keep_unknown
        self.unknown = False

    def __call__(self, key: str | None, where: str) -> bool:
        chosen = self.verdict.selects(key, self.mode, self.keep_unknown)
        if chosen is None:
            raise InputError(f"{where}: not in the verdict of {self.scan_dir}; filter the data the scanned store was "
                             "embedded from, or pass --keep-unknown to keep rows the scan never saw")
        self.unknown = key is None or key not in self.verdict.known
        return chosen


def filter_dataset(scan_dir: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, mode: str = KEEP,
                   keep_unknown: bool = False, data_format: str = "auto", image_column: str = "image",
                   progress: bool = True) -> dict:
    """Write DATA's rows that SCAN_DIR's verdict keeps (mode `keep`) or drops (`drop`) to OUT, shard by shard;
    a rerun after a crash resumes at the first shard not yet published. Returns OUT/filter.json's record."""
    if mode not in (KEEP, DROP):
        raise InputError(f"mode {mode!r}: use keep or drop")
    if data_format not in FORMATS:
        raise InputError(f"--format {data_format}: use one of {', '.join(FORMATS)}")
    kind, inputs = detect(data, data_format)
    scan_dir = Path(scan_dir)
    verdict = load_verdict(scan_dir)
    identity = {"scan": str(scan_dir.resolve()), "verdict": verdict.identity, "data": str(Path(data).resolve()),
                "format": kind, "inputs": [p.name for p in inputs], "mode": mode, "keep_unknown": keep_unknown,
                "image_column": image_column}
    output = FilterOutput(out, identity)
    choose = _Chooser(verdict, scan_dir, mode, keep_unknown)
    with progress_bar(f"filter ({kind})", total=len(verdict.known), enabled=progress, rate=True) as bar:
        if kind == "datacomp-uids":
            formats.filter_datacomp(inputs, output, choose, bar)
        for path in inputs if kind != "datacomp-uids" else ():
            if kind == "table":
                formats.filter_table(path, output, choose, image_column, bar)
            elif kind == "img2dataset":
                formats.filter_img2dataset_shard(path, output, choose, bar)
            else:
                formats.filter_tar(path, output, choose, bar)
    shards = output.record["shards"].values()
    totals = {name: sum(s[name] for s in shards) for name in formats.Counts().keys()}
    totals.update(shards=len(shards), **verdict.counts)
    return output.finish(totals)
