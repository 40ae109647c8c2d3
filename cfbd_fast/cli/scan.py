"""`cfbd-fast scan`: run CFBD (or a baseline) over a store and publish verdicts, keep-lists and a summary.

Choices and their help come from `cfbd_fast.pipeline.options`; the options are checked there, once.
"""
from __future__ import annotations

import json
import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..pipeline.options import (MAPPER_PRECISIONS, METHODS, REDUCTIONS, SCORES, SEED_SELECTORS, THRESHOLD_METHODS,
                                ScanConfig)
from ._options import Device, Json, Quiet

_DEFAULTS = ScanConfig()


def _choices(name: str, declared: dict) -> type[Enum]:
    return Enum(name, {key: key for key in declared}, type=str)


def _help(declared: dict) -> str:
    return "; ".join(f"{key}: {getattr(value, 'help', value)}" for key, value in declared.items())


Method = _choices("Method", METHODS)
SeedSelect = _choices("SeedSelect", SEED_SELECTORS)
Reduce = _choices("Reduce", REDUCTIONS)
Score = _choices("Score", SCORES)
ThresholdMethod = _choices("ThresholdMethod", THRESHOLD_METHODS)
MapperPrecision = _choices("MapperPrecision", MAPPER_PRECISIONS)


def scan(
    store: Annotated[Optional[Path], typer.Argument(help="A NAME.cfbd store directory (or give --shards).")] = None,
    mapper: Annotated[Optional[str], typer.Option(
        help="Mapping network F: a file from `cfbd-fast train-mapper`, 'self' (fitted on this store) or 'knn'.")]
    = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: STORE's name + '.scan').")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the outputs of an earlier scan in --out.")] = False,
    method: Annotated[Method, typer.Option(help=_help(METHODS))] = _DEFAULTS.method,
    components: Annotated[int, typer.Option("--components", "--k",
                                            help="GMM components of the coarse stage (the paper's K).")]
    = _DEFAULTS.components,
    gamma: Annotated[float, typer.Option(help="Posterior of the lowest component above which a pair is benign "
                                              "(the paper's gamma).")] = _DEFAULTS.gamma,
    seed_set_size: Annotated[int, typer.Option("--seed-set-size", "--q",
                                               help="Pairs in the poisoned seed set (the paper's q).")]
    = _DEFAULTS.seed_set_size,
    seed_select: Annotated[Optional[SeedSelect], typer.Option(
        help="How the seed set is chosen (default: per method). " + _help(SEED_SELECTORS))] = None,
    reduce: Annotated[Optional[Reduce], typer.Option(
        help="How z combines a caption's cosines to the seed captions (default: per method; topk for cfbd). "
             + _help(REDUCTIONS))] = None,
    topk: Annotated[int, typer.Option(help="Cosines averaged by --reduce topk.")] = _DEFAULTS.topk,
    score: Annotated[Optional[Score], typer.Option(help="Fine-stage score (default: per method). " + _help(SCORES))]
    = None,
    threshold: Annotated[Optional[float], typer.Option(help="A fixed threshold on the score (default: estimated).")]
    = None,
    threshold_method: Annotated[Optional[ThresholdMethod], typer.Option(
        help="How the verdict's cut is set when no --threshold is given (default: per method; fdr for cfbd). "
             + _help(THRESHOLD_METHODS))] = None,
    fdr: Annotated[float, typer.Option(help="False-discovery rate of --threshold-method fdr: the expected share of "
                                            "clean rows among the flagged.")] = _DEFAULTS.fdr,
    alpha: Annotated[float, typer.Option(help="Family-wise error rate of --threshold-method fwer: the chance of "
                                              "flagging any clean row.")] = _DEFAULTS.alpha,
    fpr: Annotated[float, typer.Option(help="Target false-positive rate of the estimated threshold.")]
    = _DEFAULTS.fpr,
    labels: Annotated[Optional[Path], typer.Option(
        help="Ground truth: parquet/CSV with a key column and is_poisoned/label 0/1.")] = None,
    chunk_rows: Annotated[int, typer.Option(help="Rows per streamed chunk.")] = _DEFAULTS.chunk_rows,
    device: Annotated[Device, typer.Option(help="Where the mapper and kernels run.")] = _DEFAULTS.device,
    random_seed: Annotated[int, typer.Option("--random-seed", "--seed",
                                             help="Random seed of the GMM initialisation and the samples.")]
    = _DEFAULTS.random_seed,
    knn_neighbours: Annotated[int, typer.Option(help="Captions averaged by --mapper knn.")]
    = _DEFAULTS.knn_neighbours,
    min_cluster: Annotated[int, typer.Option(help="Rows that must be significant for a caption cluster before it is "
                                                  "called a backdoor (also the smallest cluster examined).")]
    = _DEFAULTS.min_cluster,
    max_clusters: Annotated[int, typer.Option(help="Caption clusters of the seed pool tested (the least consistent "
                                                   "first).")] = _DEFAULTS.max_clusters,
    test_one_caption_groups: Annotated[bool, typer.Option(
        "--test-one-caption-groups", help="Also test caption clusters that are mostly one caption string over "
                                          "unrelated images (boilerplate, or a single-caption backdoor).")] = False,
    threads: Annotated[Optional[int], typer.Option(
        help="CPU threads for torch and numba (default: the free cores).")] = None,
    timings: Annotated[bool, typer.Option(
        "--timings", help="True per-stage times in summary.json: wait for the device after every stage (on CUDA "
                          "this stops copies and kernels from overlapping, so the scan is slower).")] = False,
    device_memory_share: Annotated[Optional[float], typer.Option(
        help="Keep the caption matrix on the device between the passes when it fits in this share of the free "
             "device memory (0: stream it twice; default: 0.5 on CUDA, 0 on the CPU).")] = None,
    mapper_precision: Annotated[MapperPrecision, typer.Option(
        help="Matmul precision of an MLP mapper. " + _help(MAPPER_PRECISIONS))] = _DEFAULTS.mapper_precision,
    report: Annotated[bool, typer.Option("--report", help="Also write report.html (see `cfbd-fast report`).")]
    = False,
    shards: Annotated[Optional[str], typer.Option(
        help="Shard stores scanned as one dataset, in sorted order: a quoted glob such as 'parts/*.cfbd'; under "
             "torchrun they are assigned to the ranks round-robin.")] = None,
    distributed: Annotated[Optional[bool], typer.Option(
        "--distributed/--no-distributed", help="Run as one rank of torch.distributed (torchrun --nproc-per-node N): "
                                               "each rank scans its rows.", show_default="when torchrun started it")]
    = None,
    timeout: Annotated[float, typer.Option(help="Seconds a rank waits for the others before the run fails.")]
    = 1800.0,
    quiet: Quiet = False,
    json_out: Json = False,
) -> None:
    """Scan STORE for backdoored pairs; write scores.parquet, poisoned.txt, keep.txt, keep.parquet, flagged.csv,
    summary.json (and report.html with --report)."""
    from ..pipeline import json_default, scan as run_scan
    from ..pipeline.publish import check_out_dir

    config = ScanConfig(
        method=method.value, components=components, gamma=gamma, seed_set_size=seed_set_size,
        seed_select=seed_select.value if seed_select else None, reduce=reduce.value if reduce else None, topk=topk,
        score=score.value if score else None, threshold=threshold,
        threshold_method=threshold_method.value if threshold_method else None, fdr=fdr, alpha=alpha, fpr=fpr,
        chunk_rows=chunk_rows, device=device.value, random_seed=random_seed,
        knn_neighbours=knn_neighbours, min_cluster=min_cluster, max_clusters=max_clusters,
        test_one_caption_groups=test_one_caption_groups, threads=threads, timings=timings,
        device_memory_share=device_memory_share, mapper_precision=mapper_precision.value).validated()
    if shards is not None or distributed or (distributed is None and _ranks_launched()):
        from ._distributed import scan_ranks

        return scan_ranks(store, shards, mapper, config, out=out, force=force, labels=labels,
                          distributed=distributed, timeout=timeout, quiet=quiet, json_out=json_out)
    if store is None:
        raise typer.BadParameter("give a STORE, or shard stores with --shards")
    out_dir = check_out_dir(out or store.with_name(store.name.removesuffix(".cfbd") + ".scan"), force=force)
    result = run_scan(store, mapper, config=config, labels=labels, progress=not quiet)
    result.write(out_dir)
    result.summary["out"] = str(out_dir)
    if report:
        from ..report import build_report

        result.summary["report"] = str(build_report(out_dir))
    for warning in result.summary["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
    if json_out:
        typer.echo(json.dumps(result.summary, indent=2, default=json_default))
    else:
        typer.echo(format_summary(result.summary))


def _ranks_launched() -> bool:
    from ..distributed.comm import launched

    return launched() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def format_summary(summary: dict) -> str:
    """A short human report of one scan."""
    cfg = summary["config"]
    counts = summary["counts"]
    lines = [f"method {cfg['method']}  rows {summary['store']['rows']:,}  dim {summary['store']['dim']}  "
             f"device {summary['device']}"]
    fit = summary.get("mapper_fit")
    if fit:
        lines.append(f"mapper fit      median cos(F(I), T) {fit['median_cos_generated_caption']:.3f}  vs the mean "
                     f"caption {fit['median_cos_mean_caption']:.3f}  "
                     f"vs cos(I, T) {fit['median_cos_image_caption']:.3f}")
    for c in summary.get("clusters", []):
        lines.append(f"cluster {c['cluster']}       {'BACKDOOR' if c['backdoor'] else 'not a backdoor'}: "
                     f"{c['size']} seed-pool rows, {c['significant_rows']} significant, caption {c['caption']!r}; "
                     f"{c['reason']}")
    cluster = summary.get("cluster")
    if cluster is not None and not cluster["found"]:
        lines.append("no backdoor cluster found; nothing flagged")
    sub = counts["subset"]
    lines.append(f"coarse subsets  benign {sub['benign']:,}  seed {sub['seed']:,}  suspicious {sub['suspicious']:,}"
                 f"  invalid {sub['invalid']:,}")
    ver = counts["verdict"]
    thr = summary["threshold"]
    cut = (f"{thr['method']} {thr['level']:g} on p-values" if "level" in thr
           else f"threshold {thr.get('value', float('nan')):.4g} on {thr['score']}, {thr['method']}")
    lines.append(f"verdicts        poisoned {ver['poisoned']:,}  benign {ver['benign']:,}  invalid {ver['invalid']:,}"
                 f"  ({cut})")
    m = summary.get("metrics")
    if m:
        lines.append(f"vs ground truth TPR {m['tpr']:.4f}  FPR {m['fpr']:.5f}  precision {m['precision']:.4f}  "
                     f"AUROC {m['auroc']:.4f}  AUPRC {m['auprc']:.4f}  TPR@FPR0.001 {m['tpr_at_fpr_0.001']:.4f}"
                     + (f"  seed precision {m['seed_precision']:.2f}" if "seed_precision" in m else ""))
    t = summary["timings_s"]
    stages = "  ".join(f"{k} {v:.2f}s" for k, v in t.items() if k != "total")
    lines.append(f"time {t['total']:.2f}s ({summary['rows_per_s']:,.0f} rows/s): {stages}")
    for warning in summary.get("warnings", []):
        lines.append(f"warning: {warning}")
    if "out" in summary:
        lines.append(f"outputs in {summary['out']}" + (f"; report {summary['report']}" if "report" in summary else ""))
    return "\n".join(lines)
