"""`cfbd-fast demo`: synthetic CLIP-like data with planted poisons -> train a mapper -> scan -> metrics.

The data is a demo and a load generator (see cfbd_fast/demo.py), not evidence of real-world accuracy.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Annotated

import typer

from ._options import Device, Json, Quiet
from .scan import format_summary

BASELINES = ("cfbd-paper", "cosine", "safeclip")


def demo(
    rows: Annotated[int, typer.Option(help="Pairs in the scanned split (3000000 for CC3M size).")] = 200_000,
    dim: Annotated[int, typer.Option(help="Embedding dimension.")] = 512,
    poison_rate: Annotated[float, typer.Option(help="Fraction of poisoned pairs (0 for a clean dataset).")] = 0.001,
    seed: Annotated[int, typer.Option(help="Seed of the generator, the mapper and the scan.")] = 0,
    out: Annotated[Path, typer.Option(help="Working directory for the stores, mapper and scan outputs.")]
    = Path("demo-out"),
    device: Annotated[Device, typer.Option(help="Where the mapper and kernels run.")] = Device.cpu,
    compare: Annotated[bool, typer.Option(help="Also run cfbd-paper, cosine and safeclip on the same data.")] = True,
    quiet: Quiet = False,
    json_out: Json = False,
) -> None:
    """Generate a demo dataset, train a mapping network on its clean split, scan it (report.html beside the outputs)
    and report the metrics."""
    from ..demo import train_demo_mapper, write_demo_stores
    from ..mapper import save_mapper
    from ..pipeline import json_default, scan

    progress = not quiet
    params = {"rows": rows, "dim": dim, "poison_rate": poison_rate, "seed": seed}
    out.mkdir(parents=True, exist_ok=True)
    record = out / "demo.json"
    mapper_path = out / "mapper.safetensors"
    scan_store, ref_store = out / "scan.cfbd", out / "reference.cfbd"
    t0 = time.perf_counter()
    reuse = record.exists() and json.loads(record.read_text()) == params and mapper_path.exists()
    if not reuse:
        for p in (scan_store, ref_store):
            shutil.rmtree(p, ignore_errors=True)
        write_demo_stores(out, rows=rows, dim=dim, poison_rate=poison_rate, seed=seed, progress=progress)
        mapper = train_demo_mapper(ref_store, seed=seed, device=device.value, progress=progress)
        save_mapper(mapper, mapper_path)
        record.write_text(json.dumps(params) + "\n")
    prepare_s = time.perf_counter() - t0

    result = scan(scan_store, mapper_path, progress=progress, device=device.value, random_seed=seed)
    from ..report import build_report

    result.write(out / "scan")
    result.summary["out"] = str(out / "scan")
    result.summary["report"] = str(build_report(out / "scan"))
    runs = {"cfbd": result.summary}
    if compare:
        for method in BASELINES:
            other = scan(scan_store, mapper_path, method=method, progress=False, device=device.value, random_seed=seed)
            runs[method] = other.summary
    if json_out:
        typer.echo(json.dumps({"params": params, "prepare_s": prepare_s, "runs": runs}, indent=2,
                              default=json_default))
        return
    typer.echo(f"demo data: {rows:,} pairs x {dim} dims, poison rate {poison_rate:g}, seed {seed} "
               f"({'reused' if reuse else 'generated'} with a trained mapper in {prepare_s:.1f}s) in {out}")
    typer.echo(format_summary(result.summary))
    if compare and "metrics" in result.summary:
        typer.echo("\nmethod      TPR     FPR      precision  AUROC   TPR@FPR0.001  flagged  time")
        for method, summ in runs.items():
            m = summ["metrics"]
            typer.echo(f"{method:10s}  {m['tpr']:.4f}  {m['fpr']:.5f}  {m['precision']:.4f}     {m['auroc']:.4f}  "
                       f"{m['tpr_at_fpr_0.001']:.4f}        {m['flagged']:<7d}  {summ['timings_s']['total']:.1f}s")
