"""`cfbd-fast scan` and `embed` as ranks of torch.distributed: the rank's share of the work, rank 0 reporting."""
from __future__ import annotations

import glob
import json
from pathlib import Path

import typer

from ..errors import InputError


def shard_paths(store: Path | None, shards: str | None) -> list[Path]:
    """The stores to scan as one dataset: STORE alone, or the --shards glob's matches in sorted order."""
    if (store is None) == (shards is None):
        raise InputError("give either a STORE or --shards 'parts/*.cfbd', not both")
    if store is not None:
        return [store]
    paths = sorted(Path(p) for p in glob.glob(shards))
    if not paths:
        raise InputError(f"--shards {shards!r} matches no store")
    return paths


def scan_ranks(store, shards, mapper, config, *, out, force, labels, distributed, timeout, quiet, json_out):
    from ..distributed import init_comm, scan_sharded
    from ..pipeline import json_default
    from .scan import format_summary

    paths = shard_paths(store, shards)
    if out is None:
        if store is None:
            raise InputError("--shards needs --out: the folder for the scan's outputs")
        out = store.with_name(store.name.removesuffix(".cfbd") + ".scan")
    comm = init_comm(distributed, device=config.device, timeout_s=timeout)
    try:
        summary = scan_sharded(paths, mapper, config=config, comm=comm, out=out, labels=labels,
                               progress=not quiet, force=force)
    finally:
        comm.close()
    if not comm.is_root:
        return
    summary["out"] = str(out)
    for warning in summary["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
    if json_out:
        typer.echo(json.dumps(summary, indent=2, default=json_default))
    else:
        typer.echo(format_summary(summary))
