"""The scan across ranks: each rank opens its share of the rows and runs the single process's stages
(`pipeline.run_stages`) with the global steps made collective (`RankGlobalSteps`), so the verdicts and scores
are a single process's; then the ranks publish their parts together.

Each rank holds O(its rows) per-row arrays plus O(seed pool + reference sample) shared rows; no rank gathers the
dataset. docs/scaling.md gives the cost model.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..errors import InputError
from ..pipeline.options import ScanConfig
from .comm import Comm
from .global_steps import RankGlobalSteps
from .publish import publish
from .rows import RankRows

SUPPORTED_METHODS = ("cfbd", "cfbd-paper", "coarse", "cosine", "safeclip")


def check_supported(cfg: ScanConfig, mapper) -> None:
    """Refuse what the sharded scan cannot compute exactly as one process does."""
    if cfg.method not in SUPPORTED_METHODS:
        raise InputError(f"method {cfg.method} is not supported by the distributed scan: use one of "
                         f"{', '.join(SUPPORTED_METHODS)}")
    if isinstance(mapper, (str, Path)) and str(mapper) in ("self", "knn"):
        raise InputError(f"--mapper {mapper} is fitted on a sample of the scanned rows and is not supported by the "
                         "distributed scan: train a mapper file (cfbd-fast train-mapper) and pass it")


def scan_sharded(paths: list[str | Path], mapper, *, config: ScanConfig, comm: Comm, out: str | Path,
                 labels: str | Path | None = None, progress: bool = False, force: bool = False) -> dict:
    """Scan the rows of `paths` (one store, or shard stores in order) on this rank's share, publish the outputs
    in `out` (rank 0 writes the whole-dataset files) and return the summary (the same on every rank)."""
    import torch

    from ..pipeline import passes, run_stages
    from ..pipeline.publish import check_out_dir
    from ..threads import configure_threads

    cfg = config.validated()
    check_supported(cfg, mapper)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {cfg.device!r}: no CUDA device is available; use device='cpu'")
    if cfg.spec.needs_mapper and mapper is None:
        raise InputError(f"method {cfg.method} needs a mapping network: give a mapper file")
    out = check_out_dir(out, force=force)
    threads = configure_threads(cfg.threads)
    t_start = time.perf_counter()
    timer = passes.Timer(cfg.device, cfg.timings)
    part = RankRows(list(paths), comm.rank, comm.world)
    steps = RankGlobalSteps(comm, part)
    s, summary = run_stages(steps, mapper, cfg, labels=labels, progress=progress and comm.is_root, timer=timer,
                            t_start=t_start, threads=threads)
    summary["distributed"] = {"world_size": comm.world, "backend": comm.backend,
                              "rows_per_rank": [int(r) for r in comm.gather_objects(part.rows, "rows per rank")],
                              "bytes_all_reduced_per_rank": int(comm.bytes_reduced())}
    steps.checkpoint("publish")
    t0 = time.perf_counter()
    publish(comm, part, s, summary, out)
    summary["timings_s"]["publish"] = round(time.perf_counter() - t0, 4)
    return summary
