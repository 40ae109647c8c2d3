"""`cfbd_fast.scan`: the CFBD pipeline over a store, out of core, behind one boundary that checks its input.

options (the choices) -> source (the one reader) -> mapping, passes, paper / clusters (the stages, on arrays)
-> publish (the one writer). `run_stages` orders the stages for one process and for each rank of a distributed
scan alike. docs/architecture.md draws it.
Memory: one chunk of each matrix at a time plus O(N) float32 score arrays.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InputError
from .global_steps import GlobalSteps
from .options import METHODS, SUBSETS, V_BENIGN, V_INVALID, V_POISONED, VERDICTS, ScanConfig, check_memory
from .publish import json_default, output_folder, publish

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["scan", "ScanConfig", "ScanResult", "METHODS", "SUBSETS", "VERDICTS", "V_BENIGN", "V_POISONED",
           "V_INVALID", "json_default"]


@dataclass
class ScanResult:
    """Per-row scores and verdicts of one scan (this process's rows: all of them, or a rank's share), the summary
    of the whole scan, and the rows' metadata."""
    store_path: str
    row_id: np.ndarray  # global row ids of these rows
    keys: "pa.Array"  # source keys (pyarrow strings, row-aligned; row ids where the store has none)
    s_o: np.ndarray
    s_g: np.ndarray
    c: np.ndarray
    posterior: np.ndarray
    subset: np.ndarray  # int8 codes into SUBSETS
    z: np.ndarray
    score: np.ndarray
    p_value: np.ndarray  # float64: each row's p-value under the null of the score (NaN where none was computed)
    cluster: np.ndarray  # int16: the caption cluster a row's z and score refer to (-1: none)
    verdict: np.ndarray  # int8 codes into VERDICTS
    summary: dict = field(default_factory=dict)
    meta: "pa.Table" = field(default=None, repr=False)  # the store's metadata, row-aligned
    source: object = field(default=None, repr=False)  # the ChunkSource the rows came from (their segments)

    @property
    def poisoned_rows(self) -> np.ndarray:
        return np.flatnonzero(self.verdict == V_POISONED)

    @property
    def kept_rows(self) -> np.ndarray:
        return np.flatnonzero(self.verdict == V_BENIGN)

    @property
    def invalid_rows(self) -> np.ndarray:
        return np.flatnonzero(self.verdict == V_INVALID)

    def write(self, out_dir: str | Path, *, force: bool = True) -> Path:
        """Publish the outputs in `out_dir` (one process): every file appears complete or not at all, summary.json
        last."""
        from ..distributed.comm import Comm

        comm = Comm()
        with output_folder(out_dir, comm, force=force) as out:
            return publish(self, out, comm)


def scan(store=None, mapper=None, *, config: ScanConfig | None = None, labels: str | Path | None = None,
         progress: bool = False, comm=None, out: str | Path | None = None, force: bool = False,
         before_commit=None, **options) -> ScanResult:
    """Run a detection method over every row of `store` and return per-row scores and verdicts.

    `store`: a path or an EmbeddingStore, or a list of shard stores scanned as one dataset (row ids numbered
    across them in order). `mapper`: a mapper file (safetensors + JSON written by `train-mapper`), "self", "knn" or
    an object with `.map(image, rows)`. Options are ScanConfig fields (method, components, gamma, seed_set_size,
    seed_select, reduce, score, threshold, threshold_method, fpr, device, random_seed, threads, ...); the paper's
    names q, k and seed are accepted too. Every option is checked here, once; bad input raises InputError.
    `comm` (distributed.comm): this process as one rank of many, scanning its share of the rows (default: one
    process alone). With `out`, the outputs are published there (the folder locked for the whole scan; `force`
    replaces an earlier scan's; `before_commit(folder)` adds files and summary entries before summary.json).
    """
    from ..distributed.comm import Comm, test_hook

    comm = comm or Comm()
    cfg = check_inputs(config, options, mapper)
    if out is None:
        return _scan_rows(store, mapper, cfg, labels, progress, comm)
    with output_folder(out, comm, force=force) as folder:
        result = _scan_rows(store, mapper, cfg, labels, progress, comm)
        test_hook("publish", comm)
        publish(result, folder, comm, before_commit=before_commit)
    return result


def check_inputs(config: ScanConfig | None, options: dict, mapper) -> ScanConfig:
    """The validated config, and the mapper and device checked against it: the one place a scan's options are
    checked."""
    import torch

    if config is not None and options:
        raise InputError("pass either config= or keyword options, not both")
    cfg = (config or ScanConfig.from_options(**options)).validated()
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {cfg.device!r}: no CUDA device is available; use device='cpu'")
    if cfg.spec.needs_mapper and mapper is None:
        raise InputError(f"method {cfg.method} needs a mapping network: give a mapper file, 'self' or 'knn'")
    if mapper is not None and not isinstance(mapper, (str, Path)) and not hasattr(mapper, "map"):
        raise InputError("mapper must be a path, 'self', 'knn' or an object with .map(image, rows)")
    return cfg


def _scan_rows(store, mapper, cfg: ScanConfig, labels, progress: bool, comm) -> ScanResult:
    """This process's rows scanned: the stages over them, with the summary of the whole scan."""
    from ..threads import configure_threads
    from . import passes
    from .source import ChunkSource

    threads = configure_threads(cfg.threads)
    t_start = time.perf_counter()
    timer = passes.Timer(cfg.device, cfg.timings)
    source = ChunkSource(store, comm.rank, comm.world)
    s, summary = run_stages(GlobalSteps(source, comm), mapper, cfg, labels=labels, progress=progress and comm.is_root,
                            timer=timer, t_start=t_start, threads=threads)
    return ScanResult(store_path=str(source.path), row_id=source.global_ids(np.arange(source.rows)),
                      keys=source.keys, s_o=s.s_o, s_g=s.s_g, c=s.c, posterior=s.posterior, subset=s.subset, z=s.z,
                      score=s.score, p_value=s.p_value, cluster=s.cluster, verdict=s.verdict, summary=summary,
                      meta=source.meta, source=source)


def run_stages(steps: GlobalSteps, mapper, cfg: ScanConfig, *, labels, progress: bool, timer, t_start: float,
               threads: int):
    """The scan's stages in order over the rows `steps` holds (steps.source: the passes' reader): the rows' Scores
    and the summary. One process and the ranks of a distributed scan run this same function; their global steps
    differ (global_steps.py)."""
    import torch

    from . import clusters, mapping, paper, passes
    from .transfer import free_memory

    source = steps.source
    if cfg.spec.needs_mapper and cfg.seed_set_size > steps.total_rows:
        raise InputError(f"seed_set_size (--seed-set-size) {cfg.seed_set_size} is larger than the store "
                         f"({steps.total_rows} rows): lower it")
    check_memory(cfg, steps.total_rows, source.dim, str(mapper) if isinstance(mapper, (str, Path)) else None,
                 free_memory(cfg.device))
    unfinished = source.unfinished()
    if unfinished and not cfg.allow_incomplete:
        raise InputError(f"{unfinished[0]}: rerun the same embed command to finish it, or scan with "
                         "--allow-incomplete")
    truth = source.labels(labels)  # resolved before any scoring
    timer.add("open", time.perf_counter() - t_start)

    mapper_fp = None
    if cfg.spec.needs_mapper:
        t0 = time.perf_counter()
        mapper, mapper_fp = mapping.resolve_mapper(mapper, steps, cfg, progress)
        if hasattr(mapper, "to"):
            mapper = mapper.to(torch.device(cfg.device))
        mapper = mapping.with_precision(mapper, cfg)
        timer.add("mapper_fit", time.perf_counter() - t0)

    steps.checkpoint("consistency")
    s = passes.consistency_pass(source, mapper, cfg, timer, progress)
    passes.check_valid(s, steps)
    s.warnings.extend(f"{line}: the outputs cover only the rows embedded so far" for line in unfinished)
    steps.checkpoint("gmm")
    if cfg.spec.verdict == "clusters":  # cfbd: every caption cluster examined
        paper.coarse_stage(s, cfg, steps, timer)
        reference = mapping.reference_sample(s, mapper, cfg, steps)
        found = clusters.cluster_stage(s, reference, cfg, steps, timer)
        steps.checkpoint("correlation")
        z = passes.cluster_correlation_pass(s, found, cfg, source, timer, progress)
        threshold = clusters.clusters_verdict(s, found, z, reference, cfg, steps, timer)
    elif cfg.spec.needs_mapper:  # cfbd-paper, coarse: one seed set
        split = paper.coarse_stage(s, cfg, steps, timer)
        corr_captions = paper.seed_stage(s, cfg, steps, timer)
        steps.checkpoint("correlation")
        passes.correlation_pass(s, corr_captions, cfg, source, timer, progress)
        threshold = paper.paper_verdict(s, split, cfg, steps, timer)
    else:
        threshold = paper.baseline_verdict(s, cfg, steps, timer)

    elapsed = time.perf_counter() - t_start
    summary = _summary(s, cfg, steps, labels, truth, mapper_fp, threshold, timer, elapsed, threads)
    return s, summary


def _summary(s, cfg: ScanConfig, steps: GlobalSteps, labels, truth, mapper_fp, threshold: dict, timer,
             elapsed: float, threads: int) -> dict:
    """The summary of the whole scan (global: counts over every row, the slowest process's times, the metrics)."""
    from ..detect import metrics
    from ..provenance import device_name, versions

    summary = dict(s.summary)
    subset_counts = steps.bincount(s.subset, len(SUBSETS))
    verdict_counts = steps.bincount(s.verdict, len(VERDICTS))
    seconds = steps.slowest(list(timer.stages.values()) + [elapsed])
    summary.update({
        "config": {**cfg.as_dict(), "labels": str(labels) if labels else None},
        "store": steps.identity,
        "mapper": mapper_fp,
        "seeds": {"rows": s.seed_rows.tolist(), "keys": steps.keys(s.seed_rows)},
        "counts": {
            "subset": {str(name): int(subset_counts[i]) for i, name in enumerate(SUBSETS)},
            "verdict": {str(name): int(verdict_counts[i]) for i, name in enumerate(VERDICTS)},
        },
        "threshold": threshold,
        "timings_s": {k: round(float(v), 4) for k, v in zip([*timer.stages, "total"], seconds)},
        "rows_per_s": steps.total_rows / float(seconds[-1]) if seconds[-1] > 0 else None,
        "device": device_name(cfg.device),
        "threads": threads,
        "versions": versions(),
        "warnings": list(s.warnings),
    })
    comm = steps.comm
    if comm.world > 1:
        summary["distributed"] = {"world_size": comm.world, "backend": comm.backend,
                                  "rows_per_rank": [int(r) for r in comm.gather_objects(steps.source.rows,
                                                                                        "rows per rank")],
                                  "bytes_all_reduced_per_rank": int(comm.bytes_reduced())}
    if truth is not None:
        summary["metrics"] = metrics.detection_metrics(*steps.in_row_order(s.valid, truth, s.verdict == V_POISONED,
                                                                           s.score))
        if len(s.seed_rows):
            summary["metrics"]["seed_precision"] = float(steps.values(truth, s.seed_rows).mean())
    return summary
