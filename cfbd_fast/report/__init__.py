"""`cfbd_fast.report`: a scan's output folder as one self-contained HTML page, and why any row got its verdict.

outputs.py reads the folder (and the scanned store, where it still is), explain.py gives each row's reasons,
plots.py draws the figures (matplotlib, imported here only), html.py lays out the page.
"""
from __future__ import annotations

from pathlib import Path

REPORT_FILE = "report.html"


def build_report(scan_dir: str | Path, out: str | Path | None = None, *, max_rows: int = 100) -> Path:
    """Write the report of the scan in `scan_dir` to `out` (default: scan_dir/report.html); return its path.

    `max_rows` caps the table of flagged rows (the most significant first; flagged.csv lists them all).
    """
    from . import html, outputs

    scan = outputs.load(scan_dir)
    try:
        text = html.page(scan, max_rows=max_rows)
    finally:
        if scan.store is not None:
            scan.store.close()
    path = Path(out) if out is not None else Path(scan_dir) / REPORT_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def explain_row(scan_dir: str | Path, key: str, neighbours: int = 5) -> dict:
    """One row's values, the reasons for its verdict and its `neighbours` nearest seed captions (JSON-safe)."""
    from . import explain, outputs

    scan = outputs.load(scan_dir)
    try:
        row = scan.row_of(key)
        entry = explain.explain_rows(scan, [row], neighbours)[0]
    finally:
        if scan.store is not None:
            scan.store.close()
    return {"scan": str(scan.folder), "method": scan.method, "notes": scan.notes, **entry}
