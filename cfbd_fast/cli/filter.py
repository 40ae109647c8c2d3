"""`cfbd-fast filter`: a scan's verdict applied to the dataset it came from, as a cleaned copy in its own format."""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ._options import Json, Quiet


class FormatName(str, Enum):
    auto = "auto"
    table = "table"
    img2dataset = "img2dataset"
    webdataset = "webdataset"
    datacomp_uids = "datacomp-uids"


def filter_data(
    scan_dir: Annotated[Path, typer.Argument(help="A scan's output folder (the --out of `cfbd-fast scan`).")],
    data: Annotated[str, typer.Argument(help="The dataset the scanned store was embedded from: a CSV/TSV table, an "
                                             "img2dataset folder, .tar shards (a folder or a quoted glob) or "
                                             "DataComp metadata (NNNNN.parquet beside NNNNN.npz).")],
    out: Annotated[Path, typer.Option("--out", help="A new folder for the filtered copy (or the folder of an "
                                                     "interrupted run of the same filter, which resumes).")],
    keep: Annotated[bool, typer.Option("--keep/--drop", help="Write the rows the scan keeps (the cleaned set), or "
                                                             "the rows it drops (flagged, invalid, unusable).")]
    = True,
    keep_unknown: Annotated[bool, typer.Option("--keep-unknown", help="Keep rows whose key the scan never saw "
                                                                      "(default: stop with an error).")] = False,
    data_format: Annotated[FormatName, typer.Option("--format", help="The dataset's format; datacomp-uids writes "
                                                                     "OUT/uids.npy for DataComp's resharder.")]
    = FormatName.auto,
    image_column: Annotated[str, typer.Option(help="A table's image column (its key, as `embed` read it).")]
    = "image",
    quiet: Quiet = False,
    json_out: Json = False,
) -> None:
    """Write a cleaned copy of DATA: the rows SCAN_DIR's verdict keeps, byte for byte, in DATA's format and shard
    layout (a table; img2dataset shards; .tar shards; a sorted DataComp uid .npy), with per-shard counts in
    OUT/filter.json. Each output shard appears complete or not at all; a rerun resumes after a crash."""
    from ..filter import DROP, KEEP, filter_dataset

    record = filter_dataset(scan_dir, data, out, mode=KEEP if keep else DROP, keep_unknown=keep_unknown,
                            data_format=data_format.value, image_column=image_column, progress=not quiet)
    totals = record["totals"]
    if json_out:
        typer.echo(json.dumps({"out": str(out), **totals, "shard_counts": record["shards"]}, indent=2))
        return
    typer.echo(f"{totals['written']:,} of {totals['rows']:,} rows written to {out} ({totals['dropped']:,} left out, "
               f"{totals['unknown']:,} unknown to the scan, {totals['shards']} shard"
               f"{'' if totals['shards'] == 1 else 's'}); counts per shard in {out / 'filter.json'}")
