"""`cfbd-fast embed` as ranks of torch.distributed: each rank embeds its share of the input shards, rank 0 reports.
(`cfbd-fast scan` takes its ranks in cli/scan.py: there they only choose the `Comm`.)"""
from __future__ import annotations

import glob
import json
from pathlib import Path

import typer

from ..errors import InputError


def input_shards(data: str) -> list[Path]:
    """The webdataset .tar shards of DATA (a folder, one file or a glob), sorted."""
    path = Path(data)
    found = sorted(path.glob("*.tar*")) if path.is_dir() else sorted(Path(p) for p in glob.glob(str(data)))
    tars = [p for p in found if p.name.endswith((".tar", ".tar.gz", ".tgz"))]
    if not tars:
        raise InputError(f"{data}: embed under torch.distributed takes webdataset .tar shards (a folder, one file "
                         "or a quoted glob); each rank embeds its share into its own shard store")
    return tars


def embed_ranks(data: str, out: Path, model: str, pretrained, *, distributed, timeout: float, json_out: bool,
                **options) -> None:
    """Each rank embeds its round-robin share of the input shards, each shard into OUT/<shard name>.cfbd; rank 0
    reports them all. Scan them together with `cfbd-fast scan --shards 'OUT/*.cfbd'`."""
    from ..distributed import init_comm
    from ..embed import embed as run_embed

    tars = input_shards(data)
    comm = init_comm(distributed, device=options.get("device") or "cpu", timeout_s=timeout)
    try:
        out.mkdir(parents=True, exist_ok=True)
        mine = [run_embed(str(tar), out / f"{tar.name.split('.')[0]}.cfbd", model, pretrained, **options).to_dict()
                for tar in tars[comm.rank::comm.world]]
        every = comm.gather_objects(mine, "gather the shard stores' summaries")
    finally:
        comm.close()
    if not comm.is_root:
        return
    stores = sorted((s for rank in every for s in rank), key=lambda s: s["store"])
    total = {"stores": stores, "ranks": comm.world, "rows_written": sum(s["rows_written"] for s in stores),
             "skipped": sum(s["skipped"] for s in stores), "out": str(out)}
    if json_out:
        typer.echo(json.dumps(total, indent=2))
        return
    for s in stores:
        typer.echo(f"store     {s['store']} ({s['rows_total']:,} rows, {s['rows_written']:,} written, "
                   f"{s['skipped']:,} skipped)")
    typer.echo(f"total     {total['rows_written']:,} rows written by {comm.world} rank(s) into {len(stores)} shard "
               f"stores; scan them with --shards '{out}/*.cfbd'")
