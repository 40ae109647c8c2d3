"""`cfbd-fast scan`: run CFBD (or a baseline) over a store and publish verdicts, keep-lists and a summary."""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._options import Device, Json, Quiet


class Method(str, Enum):
    cfbd = "cfbd"
    cfbd_paper = "cfbd-paper"
    coarse = "coarse"
    cosine = "cosine"
    safeclip = "safeclip"


class SeedSelect(str, Enum):
    top = "top"
    dense = "dense"


class Reduce(str, Enum):
    mean = "mean"
    max = "max"
    topk = "topk"


class Score(str, Enum):
    z_so = "z-so"
    z = "z"


class ThresholdMethod(str, Enum):
    null_quantile = "null-quantile"
    robust_z = "robust-z"
    gap = "gap"
    mixture = "mixture"


def scan(
    store: Annotated[Path, typer.Argument(help="A NAME.cfbd store directory.")],
    mapper: Annotated[Optional[str], typer.Option(
        help="Mapping network: a file from `cfbd-fast train-mapper`, 'self' (fit on this store) or 'knn'.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output directory (default: STORE's name + '.scan').")] = None,
    method: Annotated[Method, typer.Option(help="cfbd (our defaults), cfbd-paper, coarse, cosine or safeclip.")]
    = Method.cfbd,
    k: Annotated[int, typer.Option(help="GMM components.")] = 5,
    gamma: Annotated[float, typer.Option(help="Posterior above which a pair is benign.")] = 0.9,
    q: Annotated[int, typer.Option(help="Seed set size.")] = 50,
    seed_select: Annotated[Optional[SeedSelect], typer.Option(help="Seed selection (default: per method).")] = None,
    reduce: Annotated[Reduce, typer.Option(help="How z combines the seed cosines.")] = Reduce.mean,
    topk: Annotated[int, typer.Option(help="k for --reduce topk.")] = 5,
    score: Annotated[Optional[Score], typer.Option(help="Fine-stage score (default: per method).")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Fixed threshold on the score (default: estimated).")]
    = None,
    threshold_method: Annotated[Optional[ThresholdMethod], typer.Option(
        help="Estimator when no --threshold is given (default: gap, chosen by measurement).")] = None,
    fpr: Annotated[float, typer.Option(help="Target false-positive rate of the estimated threshold.")] = 0.001,
    labels: Annotated[Optional[Path], typer.Option(
        help="Ground truth: parquet/CSV with a key column and is_poisoned/label 0/1.")] = None,
    chunk_rows: Annotated[int, typer.Option(help="Rows per streamed chunk.")] = 16384,
    device: Annotated[Device, typer.Option(help="Where the mapper and kernels run.")] = Device.cpu,
    seed: Annotated[int, typer.Option(help="Random seed (GMM init, samples).")] = 0,
    quiet: Quiet = False,
    json_out: Json = False,
) -> None:
    """Scan STORE for backdoored pairs; write scores.parquet, poisoned.txt, keep.txt, keep.parquet, summary.json."""
    from ..pipeline import json_default, scan as run_scan

    result = run_scan(
        store, mapper, labels=labels, progress=not quiet, method=method.value, k=k, gamma=gamma, q=q,
        seed_select=seed_select.value if seed_select else None, reduce=reduce.value, topk=topk,
        score=score.value if score else None, threshold=threshold, fpr=fpr, chunk_rows=chunk_rows,
        device=device.value, seed=seed, **({"threshold_method": threshold_method.value} if threshold_method else {}),
    )
    out_dir = out or store.with_name(store.name.removesuffix(".cfbd") + ".scan")
    result.write(out_dir)
    result.summary["out"] = str(out_dir)
    if json_out:
        typer.echo(json.dumps(result.summary, indent=2, default=json_default))
    else:
        typer.echo(format_summary(result.summary))


def format_summary(summary: dict) -> str:
    """A short human table of one scan."""
    cfg = summary["config"]
    counts = summary["counts"]
    lines = [f"method {cfg['method']}  rows {summary['store']['rows']:,}  dim {summary['store']['dim']}  "
             f"device {summary['device']}"]
    cluster = summary.get("cluster")
    if cluster is not None and not cluster["found"]:
        lines.append(f"no backdoor cluster found: {cluster['reason']}; nothing flagged")
    elif cluster is not None:
        lines.append(f"backdoor cluster: {cluster['cluster_rows']} of {cluster['seed_rows']} seeds, caption "
                     f"coherence {cluster['cluster_coherence']:.3f} (random captions {cluster['null_coherence']:.3f})")
    sub = counts["subset"]
    lines.append(f"coarse subsets  benign {sub['benign']:,}  seed {sub['seed']:,}  suspicious {sub['suspicious']:,}"
                 f"  invalid {sub['invalid']:,}")
    ver = counts["verdict"]
    thr = summary["threshold"]
    lines.append(f"verdicts        poisoned {ver['poisoned']:,}  benign {ver['benign']:,}  invalid {ver['invalid']:,}"
                 f"  (threshold {thr['value']:.4g} on {thr['score']}, {thr['method']})")
    m = summary.get("metrics")
    if m:
        lines.append(f"vs ground truth TPR {m['tpr']:.4f}  FPR {m['fpr']:.5f}  precision {m['precision']:.4f}  "
                     f"AUROC {m['auroc']:.4f}  AUPRC {m['auprc']:.4f}  TPR@FPR0.001 {m['tpr_at_fpr_0.001']:.4f}"
                     + (f"  seed precision {m['seed_precision']:.2f}" if "seed_precision" in m else ""))
    t = summary["timings_s"]
    stages = "  ".join(f"{k} {v:.2f}s" for k, v in t.items() if k != "total")
    lines.append(f"time {t['total']:.2f}s ({summary['rows_per_s']:,.0f} rows/s): {stages}")
    if "out" in summary:
        lines.append(f"outputs in {summary['out']}")
    return "\n".join(lines)
