"""`cfbd-fast scan`: run CFBD (or a baseline) over a store and publish verdicts, keep-lists and a summary.

One command for every route: one store or --shards, one process or a rank of torch.distributed (--distributed,
or started by torchrun); the routes differ only in the stores read and the `Comm` (pipeline.scan does the rest).
Choices and their help come from `cfbd_fast.pipeline.options`; the options are checked there, once.
"""
from __future__ import annotations

import glob
import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..pipeline.options import (MAPPER_PRECISIONS, METHODS, REDUCTIONS, SCORES, SEED_SELECTORS, THRESHOLD_METHODS,
                                ScanConfig)
from ..errors import InputError
from ._options import Device, Json, Quiet

_DEFAULTS = ScanConfig()
MAX_TIMEOUT_S = 7 * 24 * 3600


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


Store = Annotated[Optional[Path], typer.Argument(help="A NAME.cfbd store directory (or give --shards).")]
MapperOpt = Annotated[Optional[str], typer.Option(
    "--mapper", help="Mapping network F: a file from `cfbd-fast train-mapper`, 'self' (fitted on this store) or "
                     "'knn'.")]
Out = Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: STORE's name + '.scan').")]
Force = Annotated[bool, typer.Option("--force", help="Replace the outputs of an earlier scan in --out (the whole "
                                                     "scan: report.html too).")]
MethodOpt = Annotated[Method, typer.Option("--method", help=_help(METHODS))]
Components = Annotated[int, typer.Option("--components", "--k", help="GMM components of the coarse stage (the "
                                                                     "paper's K).")]
Gamma = Annotated[float, typer.Option("--gamma", help="Posterior of the lowest component above which a pair is "
                                                      "benign (the paper's gamma).")]
SeedSetSize = Annotated[int, typer.Option("--seed-set-size", "--q", help="Pairs in the poisoned seed set (the "
                                                                         "paper's q).")]
SeedSelectOpt = Annotated[Optional[SeedSelect], typer.Option(
    "--seed-select", help="How the seed set is chosen (default: per method). " + _help(SEED_SELECTORS))]
ReduceOpt = Annotated[Optional[Reduce], typer.Option(
    "--reduce", help="How z combines a caption's cosines to the seed captions (default: per method; topk for "
                     "cfbd). " + _help(REDUCTIONS))]
TopK = Annotated[int, typer.Option("--topk", help="Cosines averaged by --reduce topk.")]
ScoreOpt = Annotated[Optional[Score], typer.Option("--score", help="Fine-stage score (default: per method). "
                                                                   + _help(SCORES))]
Threshold = Annotated[Optional[float], typer.Option("--threshold", help="A fixed threshold on the score (default: "
                                                                        "estimated).")]
ThresholdMethodOpt = Annotated[Optional[ThresholdMethod], typer.Option(
    "--threshold-method", help="How the verdict's cut is set when no --threshold is given (default: per method; "
                               "fdr for cfbd). " + _help(THRESHOLD_METHODS))]
Fdr = Annotated[float, typer.Option("--fdr", help="False-discovery rate of --threshold-method fdr: the expected "
                                                  "share of clean rows among the flagged.")]
Alpha = Annotated[float, typer.Option("--alpha", help="Family-wise error rate of --threshold-method fwer: the "
                                                      "chance of flagging any clean row.")]
Fpr = Annotated[float, typer.Option("--fpr", help="Target false-positive rate of the estimated threshold.")]
Labels = Annotated[Optional[Path], typer.Option(
    "--labels", help="Ground truth: parquet/CSV with a key column and is_poisoned/label 0/1.")]
ChunkRows = Annotated[int, typer.Option("--chunk-rows", help="Rows per streamed chunk.")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="Where the mapper and kernels run.")]
RandomSeed = Annotated[int, typer.Option("--random-seed", "--seed", help="Random seed of the GMM initialisation "
                                                                         "and the samples.")]
KnnNeighbours = Annotated[int, typer.Option("--knn-neighbours", help="Captions averaged by --mapper knn.")]
MinCluster = Annotated[int, typer.Option("--min-cluster", help="Rows that must be significant for a caption "
                                                               "cluster before it is called a backdoor (also the "
                                                               "smallest cluster examined).")]
MaxClusters = Annotated[int, typer.Option("--max-clusters", help="Caption clusters of the seed pool tested (the "
                                                                 "least consistent first).")]
OneCaptionGroups = Annotated[bool, typer.Option(
    "--test-one-caption-groups", help="Also test caption clusters that are mostly one caption string whose caption "
                                      "describes no image of the data (boilerplate); grounded ones are tested anyway.")]
Threads = Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch and numba (default: the "
                                                                  "free cores).")]
Timings = Annotated[bool, typer.Option(
    "--timings", help="True per-stage times in summary.json: wait for the device after every stage (on CUDA this "
                      "stops copies and kernels from overlapping, so the scan is slower).")]
DeviceMemoryShare = Annotated[Optional[float], typer.Option(
    "--device-memory-share", help="Keep the caption matrix on the device between the passes when it fits in this "
                                  "share of the free device memory (0: stream it twice; default: 0.5 on CUDA, 0 on "
                                  "the CPU).")]
MapperPrecisionOpt = Annotated[MapperPrecision, typer.Option(
    "--mapper-precision", help="Matmul precision of an MLP mapper. " + _help(MAPPER_PRECISIONS))]
Report = Annotated[bool, typer.Option("--report", help="Also write report.html (see `cfbd-fast report`).")]
Shards = Annotated[Optional[str], typer.Option(
    "--shards", help="Shard stores scanned as one dataset, in sorted order: a quoted glob such as 'parts/*.cfbd'; "
                     "under torchrun they are assigned to the ranks round-robin.")]
Distributed = Annotated[Optional[bool], typer.Option(
    "--distributed/--no-distributed", help="Run as one rank of torch.distributed (torchrun --nproc-per-node N): "
                                           "each rank scans its rows.", show_default="when torchrun started it")]
AllowIncomplete = Annotated[bool, typer.Option(
    "--allow-incomplete", help="Scan a store whose embedding was stopped before the end of its input (refused "
                               "otherwise): the outputs cover only the rows embedded so far.")]
Timeout = Annotated[float, typer.Option("--timeout", help="Seconds a rank waits for the others before the run "
                                                          "fails.")]


def scan(store: Store = None, mapper: MapperOpt = None, out: Out = None, force: Force = False,
         method: MethodOpt = _DEFAULTS.method, components: Components = _DEFAULTS.components,
         gamma: Gamma = _DEFAULTS.gamma, seed_set_size: SeedSetSize = _DEFAULTS.seed_set_size,
         seed_select: SeedSelectOpt = None, reduce: ReduceOpt = None, topk: TopK = _DEFAULTS.topk,
         score: ScoreOpt = None, threshold: Threshold = None, threshold_method: ThresholdMethodOpt = None,
         fdr: Fdr = _DEFAULTS.fdr, alpha: Alpha = _DEFAULTS.alpha, fpr: Fpr = _DEFAULTS.fpr, labels: Labels = None,
         chunk_rows: ChunkRows = _DEFAULTS.chunk_rows, device: DeviceOpt = _DEFAULTS.device,
         random_seed: RandomSeed = _DEFAULTS.random_seed, knn_neighbours: KnnNeighbours = _DEFAULTS.knn_neighbours,
         min_cluster: MinCluster = _DEFAULTS.min_cluster, max_clusters: MaxClusters = _DEFAULTS.max_clusters,
         test_one_caption_groups: OneCaptionGroups = False, threads: Threads = None, timings: Timings = False,
         device_memory_share: DeviceMemoryShare = None,
         mapper_precision: MapperPrecisionOpt = _DEFAULTS.mapper_precision, report: Report = False,
         shards: Shards = None, distributed: Distributed = None, timeout: Timeout = 1800.0,
         allow_incomplete: AllowIncomplete = False, quiet: Quiet = False, json_out: Json = False) -> None:
    """Scan STORE for backdoored pairs; write scores.parquet, poisoned.txt, keep.txt, keep.parquet, flagged.csv,
    summary.json (and report.html with --report)."""
    from ..distributed.comm import init_comm, ranks_launched
    from ..pipeline import json_default, scan as run_scan

    config = ScanConfig(
        method=method.value, components=components, gamma=gamma, seed_set_size=seed_set_size,
        seed_select=seed_select.value if seed_select else None, reduce=reduce.value if reduce else None, topk=topk,
        score=score.value if score else None, threshold=threshold,
        threshold_method=threshold_method.value if threshold_method else None, fdr=fdr, alpha=alpha, fpr=fpr,
        chunk_rows=chunk_rows, device=device.value, random_seed=random_seed,
        knn_neighbours=knn_neighbours, min_cluster=min_cluster, max_clusters=max_clusters,
        test_one_caption_groups=test_one_caption_groups, threads=threads, timings=timings,
        device_memory_share=device_memory_share, mapper_precision=mapper_precision.value,
        allow_incomplete=allow_incomplete)
    if not 0 < timeout <= MAX_TIMEOUT_S:
        raise InputError(f"--timeout {timeout:g}: give the seconds a rank waits, more than 0 and at most "
                         f"{MAX_TIMEOUT_S:,} (a week)")
    paths = shard_paths(store, shards)
    if out is None and store is None:
        raise InputError("--shards needs --out: the folder for the scan's outputs")
    out = out or store.with_name(store.name.removesuffix(".cfbd") + ".scan")
    comm = init_comm(bool(distributed or (distributed is None and ranks_launched())), device=config.device,
                     timeout_s=timeout)
    try:
        result = run_scan(paths if shards else store, mapper, config=config, labels=labels, progress=not quiet,
                          comm=comm, out=out, force=force, before_commit=_write_report if report else None)
    finally:
        comm.close()
    if not comm.is_root:
        return
    for warning in result.summary["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(json.dumps(result.summary, indent=2, default=json_default) if json_out
               else format_summary(result.summary))


def _write_report(folder: Path) -> dict:
    """The report of the outputs in `folder`, written there before the scan is committed."""
    from ..report import REPORT_FILE, build_report

    build_report(folder)
    return {"report": str(Path(json.loads((folder / "summary.json").read_text())["out"]) / REPORT_FILE)}


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
                     f"{c['size']} seed-pool rows, {c['members']} members, caption {c['caption']!r}; "
                     f"{c['reason']}")
    cluster = summary.get("cluster")
    if cluster is not None and not cluster["found"]:
        lines.append("no backdoor cluster found; nothing flagged")
    sub = counts["subset"]
    lines.append(f"coarse subsets  benign {sub['benign']:,}  seed {sub['seed']:,}  suspicious {sub['suspicious']:,}"
                 f"  invalid {sub['invalid']:,}")
    ver = counts["verdict"]
    thr = summary["threshold"]
    value = thr.get("value", cfg.get("threshold"))  # a given cut may be recorded in the config only
    cut = (f"{thr['method']} {thr['level']:g} on p-values" if "level" in thr
           else f"threshold {value:.4g} on {thr['score']}, {thr['method']}" if value is not None
           else f"a threshold per cluster on {thr['score']}, {thr['method']}")
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
