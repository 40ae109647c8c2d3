"""`cfbd-fast report` and `cfbd-fast explain`: a scan's outputs as one HTML page, and why a row got its verdict."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._options import Json, Quiet

ScanDir = Annotated[Path, typer.Argument(help="A scan's output folder (the --out of `cfbd-fast scan`).")]


def report(
    scan_dir: ScanDir,
    out: Annotated[Optional[Path], typer.Option(help="Where to write the page (default: SCAN_DIR/report.html).")]
    = None,
    max_rows: Annotated[int, typer.Option(help="Flagged rows listed with their explanation (the most significant "
                                               "first; flagged.csv has them all).")] = 100,
    quiet: Quiet = False,
    json_out: Json = False,
) -> None:
    """Write one self-contained HTML page of a scan: counts, the GMM and score plots, each caption cluster with its
    captions and images, ROC and precision-recall curves when labels are known, the flagged rows and timings."""
    from ..errors import InputError
    from ..report import build_report

    if not 0 <= max_rows <= 1_000_000:
        raise InputError(f"--max-rows {max_rows}: give a whole number from 0 to 1,000,000")
    path = build_report(scan_dir, out, max_rows=max_rows)
    if json_out:
        typer.echo(json.dumps({"report": str(path), "bytes": path.stat().st_size}))
    elif not quiet:
        typer.echo(f"report written to {path} ({path.stat().st_size / 1e6:.1f} MB)")


def explain(
    scan_dir: ScanDir,
    key: Annotated[str, typer.Argument(help="The row's source key, as in poisoned.txt or scores.parquet.")],
    neighbours: Annotated[int, typer.Option(help="Nearest seed captions shown.")] = 5,
    json_out: Json = False,
) -> None:
    """Why a row got its verdict: its s_o, s_g, c, subset, cluster, z, score, p-value, the cut, and the seed
    captions nearest to its caption."""
    from ..errors import InputError
    from ..pipeline import json_default
    from ..report import explain_row

    if not 0 <= neighbours <= 1000:
        raise InputError(f"--neighbours {neighbours}: give a whole number from 0 to 1,000")
    entry = explain_row(scan_dir, key, neighbours)
    if json_out:
        typer.echo(json.dumps(entry, indent=2, default=json_default))
        return
    typer.echo(format_explanation(entry))


def format_explanation(e: dict) -> str:
    def num(x) -> str:
        return "n/a" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)

    lines = [f"key {e['key']}  row {e['row_id']}  verdict {e['verdict'].upper()}  ({e['method']} scan)"]
    if e["caption"] is not None:
        lines.append(f"caption  {e['caption']!r}")
    if e["image"] is not None:
        lines.append(f"image    {e['image']}")
    if e["label"] is not None:
        lines.append(f"label    {'poisoned' if e['label'] else 'clean'} (ground truth)")
    lines.append("  ".join(f"{name} {num(e[name])}" for name in ("s_o", "s_g", "c", "posterior", "subset",
                                                                  "cluster", "z", "score", "threshold")))
    lines.append(f"p-value  {num(e['p_value'])}")
    lines += [f"- {reason}" for reason in e["reasons"]]
    if e["nearest_seeds"]:
        lines.append(f"nearest of {e['nearest_seeds_of']} (cosine of the captions):")
        lines += [f"  {n['cosine']:.3f}  {n['key']}  {n['caption']!r}" for n in e["nearest_seeds"]]
    lines += [f"note: {note}" for note in e["notes"]]
    return "\n".join(lines)
