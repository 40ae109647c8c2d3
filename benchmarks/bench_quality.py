"""Detection quality on real images, across domains: `cfbd-fast poison` attacks on the Twemoji and Openclipart
benchmarks (realdata.py), embedded with each domain's towers (full recipe, weak), at each scan size, scanned by
`cfbd` (mapper trained on the domain's clean mapper part, and `--mapper self`) and by the `simple` baseline
(baseline_simple.py); other methods on request.

Protocol against overfitting: with `--grid NAME=V1,V2 ...` every setting of the scan options is run on both domains;
the setting chosen on one domain (fewest failed cases, then the highest mean TPR) is reported on the other, both
ways. A case fails when a poisoned case has TPR < 0.95 or FPR > 0.002, or a clean case flags more than 0.001.
Without a grid the `--option` setting is reported on every cell. One table per (domain, tower, size); each run's
per-row scores and verdicts go to bench-data/quality/rows/ (parquet) for analysis.
Usage: python benchmarks/bench_quality.py [--domains ...] [--towers full weak] [--sizes 2000 10000] [--cases ...]
       [--option k=JSON ...] [--grid k=V1,V2 ...] [--mappers trained self] [--methods cfbd simple]
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality_data import (CLEAN_CASES, WORK, Cell, case_specs, case_store, embed_csv,  # noqa: E402,F401
                          train_reference_mapper)

METHODS = ("cfbd", "simple")
MAPPED = ("cfbd", "cfbd-paper", "coarse")  # the methods that take a mapper
COLUMNS = ("case", "mapper", "method", "tp", "fp", "tpr", "fpr", "precision", "auroc", "auprc", "tpr@0.001",
           "fpr@tpr1", "clusters", "time_s")
TPR_MIN, FPR_MAX, CLEAN_FPR_MAX = 0.95, 0.002, 0.001


def run_method(store: Path, method: str, mapper: str | None, options: dict) -> tuple[dict, dict]:
    """One scan of a store: (metrics, per-row arrays). Metrics count every flagged row of a clean case as a false
    positive; ranking metrics need poisoned rows."""
    from baseline_simple import simple_scores

    from cfbd_fast import scan
    from cfbd_fast.pipeline import V_POISONED
    from cfbd_fast.store import EmbeddingStore

    started = time.perf_counter()
    opened = EmbeddingStore.open(store)
    truth = np.asarray(opened.meta.column("is_poisoned").to_numpy(zero_copy_only=False), dtype=bool) \
        if "is_poisoned" in opened.meta.column_names else np.zeros(len(opened), dtype=bool)
    clusters = ""
    if method == "simple":
        out = simple_scores(np.asarray(opened.image), np.asarray(opened.text))
        rows = dict(c=out["c"], s_o=out["s_o"], z=out["z"], score=out["score"], flagged=out["flagged"])
    else:
        result = scan(store, mapper if method in MAPPED else None, method=method, labels=None, **options)
        rows = dict(c=result.c, s_o=result.s_o, z=result.z, score=result.score, p_value=result.p_value,
                    cluster=result.cluster, flagged=result.verdict == V_POISONED)
        found = result.summary.get("clusters", [])
        clusters = f"{sum(c['backdoor'] for c in found)}/{len(found)}" if found else ""
    metrics = _metrics(truth, rows["flagged"], rows["score"], np.isfinite(rows["c"]))
    metrics.update(clusters=clusters, time_s=time.perf_counter() - started)
    rows["is_poisoned"] = truth
    return metrics, rows


def _metrics(truth: np.ndarray, flagged: np.ndarray, score: np.ndarray, valid: np.ndarray) -> dict:
    """Over the valid rows (finite embeddings), as the scan's summary counts them; a row without a score (outside
    every tested cluster) ranks lowest."""
    from cfbd_fast.detect.metrics import detection_metrics

    m = detection_metrics(truth[valid], flagged[valid], score[valid])
    m["fp"] = int((flagged & ~truth).sum())  # invalid rows never flagged; counted over every row
    m["fpr"] = m["fp"] / max(int((~truth).sum()), 1)
    return m


def table_row(case: str, mapper: str, method: str, m: dict) -> dict:
    return {"case": case, "mapper": mapper, "method": method, "tp": m["true_positives"], "fp": m["fp"],
            "tpr": m["tpr"], "fpr": m["fpr"], "precision": m["precision"], "auroc": m["auroc"], "auprc": m["auprc"],
            "tpr@0.001": m["tpr_at_fpr_0.001"], "fpr@tpr1": m["fpr_at_tpr_1"], "clusters": m["clusters"],
            "time_s": m["time_s"]}


def fails(row: dict) -> bool:
    """The bar every method is held to: poisoned cases TPR >= 0.95 at FPR <= 0.2%; clean cases FPR <= 0.1%."""
    if row["case"] in CLEAN_CASES:
        return row["fpr"] > CLEAN_FPR_MAX
    return not (row["tpr"] >= TPR_MIN and row["fpr"] <= FPR_MAX)


def fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.3f}"
    return str(value)


def print_table(rows: list[dict], title: str, out=None) -> None:
    lines = [f"\n## {title}\n", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    print("\n".join(lines), flush=True)
    if out is not None:
        out.write("\n".join(lines) + "\n")


def notes(rows: list[dict]) -> list[str]:
    """Per cell: the cases where cfbd fails the bar, and where `simple` beats it (more poisons caught at no more
    false positives or within the bar, or fewer false positives at no fewer poisons caught)."""
    out = []
    simple = {r["case"]: r for r in rows if r["method"] == "simple"}
    for r in rows:
        if r["method"] != "cfbd":
            continue
        tag = f"{r['case']} ({r['mapper']})"
        if fails(r):
            out.append(f"cfbd below the bar: {tag}: tp {r['tp']}, fp {r['fp']}, tpr {fmt(r['tpr'])}")
        s = simple.get(r["case"])
        caught = s is not None and (s["tp"] > 0 or r["case"] in CLEAN_CASES)  # both missing everything: no win
        more = caught and s["tp"] > r["tp"] and (s["fp"] <= r["fp"] or not fails(s))  # more caught, within the bar
        if more or (caught and s["fp"] < r["fp"] and s["tp"] >= r["tp"]):
            out.append(f"simple beats cfbd: {tag}: simple tp {s['tp']} fp {s['fp']}, cfbd tp {r['tp']} fp {r['fp']}")
    return out


def run_cell(cell: Cell, cases: dict, methods: list[str], mappers: list[str], options: dict, tag: str,
             rows_dir: Path) -> list[dict]:
    """Every case x method (x mapper) of one cell with one setting; writes each run's per-row parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cfbd_fast.errors import InputError

    rows = []
    folder = rows_dir / re.sub(r"[^A-Za-z0-9_.=-]+", "_", tag).strip("_") / cell.name.replace("/", "-")
    folder.mkdir(parents=True, exist_ok=True)
    for name, spec in cases.items():
        try:
            store = cell.case(name, spec)
        except InputError as exc:
            print(f"skipped {cell.name} {name}: {exc}", flush=True)
            continue
        for method in methods:
            for mapper in (mappers if method in MAPPED else ["-"]):
                path = {"trained": str(cell.mapper), "self": "self"}.get(mapper)
                m, per_row = run_method(store, method, path, options)
                rows.append(dict(table_row(name, mapper, method, m), cell=cell.name, setting=tag))
                pq.write_table(pa.table({"row": np.arange(len(per_row["score"])), **per_row}),
                               folder / f"{name}-{method}-{mapper}.parquet")
                print(json.dumps({k: fmt(v) for k, v in rows[-1].items()}), flush=True)
    return rows


def settings(options: dict, grid: list[str]) -> list[dict]:
    """The scan options of every setting: `options` plus each combination of the grid's values."""
    axes = [(k, [json.loads(v) for v in values.split(",")]) for k, values in (g.split("=", 1) for g in grid)]
    return [dict(options, **dict(zip([k for k, _ in axes], combo))) for combo in
            itertools.product(*[values for _, values in axes])] or [dict(options)]


def choose(rows: list[dict], tags: list[str], domain: str) -> str:
    """The setting with the fewest failed cfbd runs on `domain`'s cells, then the highest mean TPR."""
    def key(tag):
        mine = [r for r in rows if r["setting"] == tag and r["method"] == "cfbd" and r["cell"].startswith(domain)]
        tprs = [r["tpr"] for r in mine if r["tpr"] == r["tpr"]]
        return sum(map(fails, mine)), -float(np.mean(tprs)) if tprs else 0.0
    return min(tags, key=key)


def main(argv=None) -> None:
    import realdata

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domains", nargs="*", default=list(realdata.DOMAINS), choices=realdata.DOMAINS)
    ap.add_argument("--towers", nargs="*", default=["full", "weak"], choices=("full", "weak"))
    ap.add_argument("--sizes", type=int, nargs="*", default=[2000])
    ap.add_argument("--cases", nargs="*", default=None,
                    help="default: all of " + ", ".join(case_specs()).replace("%", "%%"))
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--mappers", nargs="*", default=["trained", "self"])
    ap.add_argument("--poison-seed", type=int, default=1)
    ap.add_argument("--option", action="append", default=[], help="scan option as NAME=JSON, e.g. fdr=0.01")
    ap.add_argument("--grid", action="append", default=[], help="a tuned option: NAME=JSON1,JSON2,...")
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--out", type=Path, default=None, help="CSV of every run (default WORK/quality.csv; tables: .md)")
    args = ap.parse_args(argv)
    options = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.option)}
    all_cases = case_specs(args.poison_seed)
    unknown = set(args.cases or []) - set(all_cases)
    if unknown:
        ap.error(f"unknown cases {sorted(unknown)}: choose from {', '.join(all_cases)}")
    cases = {k: v for k, v in all_cases.items() if args.cases is None or k in args.cases}

    from _common import machine
    from cfbd_fast.threads import configure_threads

    configure_threads()
    out = args.out or args.work / "quality.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    markdown = open(out.with_suffix(".md"), "w")
    header = (f"# bench_quality: {' '.join(sys.argv[1:]) or 'defaults'}; {time.strftime('%Y-%m-%d')}; {machine()}; "
              f"poison seed {args.poison_seed}")
    print(header)
    markdown.write(header + "\n")
    cells = [Cell(d, t, s, args.work).build() for d in args.domains for t in args.towers for s in args.sizes]
    grid = settings(options, args.grid)
    tags = [json.dumps(g, sort_keys=True) if g else "defaults" for g in grid]
    rows = []
    for setting, tag in zip(grid, tags):
        for cell in cells:
            rows += run_cell(cell, cases, args.methods, args.mappers, setting, tag, args.work / "rows")
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["setting", "cell", *COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    reported = {d: tags[0] for d in args.domains}
    if len(tags) > 1:
        for tuned in args.domains:
            chosen = choose(rows, tags, tuned)
            for other in [d for d in args.domains if d != tuned] or [tuned]:
                reported[other] = chosen
                line = f"\ntuned on {tuned}: {chosen}; reported on {other}"
                print(line)
                markdown.write(line + "\n")
    for cell in cells:
        tag = reported[cell.domain]
        mine = [r for r in rows if r["cell"] == cell.name and r["setting"] == tag]
        print_table(mine, f"{cell.name} (tower test R@1 {cell.retrieval['r1']:.3f}; setting {tag})", markdown)
        for line in notes(mine):
            print(f"- {line}")
            markdown.write(f"- {line}\n")
    markdown.close()


if __name__ == "__main__":
    main()
