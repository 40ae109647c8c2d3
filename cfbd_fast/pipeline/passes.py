"""The scan's two streamed passes over the store, and the per-row arrays they fill.

Pass 1 maps each chunk's images with F and computes s_o, s_g and c; pass 2 correlates each chunk's captions with
seed captions. Everything between the passes works on the arrays in `Scores`. Chunks reach the device through
`transfer.ChunkFeeder` and results stay on the device until a pass ends, so a pass synchronises once, not per
chunk (unless `timings` asks for per-stage times).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .. import ops
from ..errors import InputError
from ..progress import progress_bar
from .options import INVALID, SUSPICIOUS, V_BENIGN, V_INVALID, ScanConfig
from .source import ChunkSource
from .transfer import ChunkFeeder, DeviceOutputs, ResidentMatrix, plan_resident


class Timer:
    """Wall time per stage. With `sync_stages` (--timings) every stage waits for the CUDA device before the clock
    is read, which gives true per-stage times but stops copies and kernels from overlapping; without it a CUDA
    stage's time is the time to issue its work, and the waiting lands in the stage that reads results back."""

    def __init__(self, device: str, sync_stages: bool = False):
        self.stages: dict[str, float] = {}
        self._cuda = str(device).startswith("cuda")
        self.sync_stages = sync_stages

    def sync(self) -> None:
        """Wait for the device when per-stage times are asked for."""
        if self.sync_stages:
            self.wait()

    def wait(self) -> None:
        """Wait for the device (CUDA); a no-op on the CPU."""
        if self._cuda:
            import torch

            torch.cuda.synchronize()

    def add(self, name: str, seconds: float) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + seconds


@dataclass
class Scores:
    """Per-row arrays every stage adds to (float32, NaN where a stage did not apply)."""
    s_o: np.ndarray
    s_g: np.ndarray
    c: np.ndarray
    valid: np.ndarray
    posterior: np.ndarray = None
    subset: np.ndarray = None
    z: np.ndarray = None
    score: np.ndarray = None
    verdict: np.ndarray = None
    p_value: np.ndarray = None
    cluster: np.ndarray = None  # int16: the cluster a row's score refers to (-1: none)
    seed_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    summary: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    text_on_device: ResidentMatrix | None = None  # the caption matrix kept on the device for pass 2, if it fits


# -- pass 1 --------------------------------------------------------------------------------------------------
def consistency_pass(source: ChunkSource, mapper, cfg: ScanConfig, timer: Timer, progress: bool) -> Scores:
    """s_o, s_g and c for every row of `source` (NaN for rows with NaN/inf or zero-norm vectors: the kernels mark
    them; `check_valid` then counts them over all rows).

    Keeps the caption matrix on the device for pass 2 when it fits in --device-memory-share of the free memory.
    """
    import torch

    n, device = source.rows, torch.device(cfg.device)
    needs_mapper = cfg.spec.needs_mapper
    resident = None
    if needs_mapper and plan_resident(n, source.dim, source.store.dtype.itemsize, device, cfg.device_memory_share):
        resident = ResidentMatrix(n, source.dim, ops.as_tensor(source.store.matrix("text")[:1], "text").dtype,
                                  device)
    feeder = ChunkFeeder(device, staged=cfg.stage_chunks, keep={"text": resident} if resident else None)
    out = DeviceOutputs(n, ("s_o", "s_g", "c"), device)
    with progress_bar("consistency", n, enabled=progress) as bar, torch.no_grad():
        t0 = time.perf_counter()
        for chunk in feeder.feed(source.chunks(cfg.chunk_rows, ("image", "text"))):
            lo, hi = chunk.start, chunk.stop
            timer.sync()
            timer.add("read", time.perf_counter() - t0)
            gen = chunk.text  # baselines need s_o only
            if needs_mapper:
                t0 = time.perf_counter()
                gen = mapper.map(chunk.image.float(), source.global_ids(np.arange(lo, hi)))
                timer.sync()
                timer.add("mapper", time.perf_counter() - t0)
            t0 = time.perf_counter()
            cc, so, sg = ops.consistency(chunk.image, chunk.text, gen)
            out["s_o"][lo:hi] = so
            if needs_mapper:
                out["s_g"][lo:hi] = sg
                out["c"][lo:hi] = cc
            timer.sync()
            timer.add("consistency", time.perf_counter() - t0)
            bar.advance(hi - lo)
            t0 = time.perf_counter()
        t0 = time.perf_counter()
        results = out.numpy()
        timer.add("consistency", time.perf_counter() - t0)
    s_o, s_g, c = results["s_o"], results["s_g"], results["c"]
    valid = ~np.isnan(c) if needs_mapper else ~np.isnan(s_o)
    subset = np.full(n, SUSPICIOUS, dtype=np.int8)
    subset[~valid] = INVALID
    verdict = np.full(n, V_BENIGN, dtype=np.int8)
    verdict[~valid] = V_INVALID
    return Scores(s_o=s_o, s_g=s_g, c=c, valid=valid, posterior=np.full(n, np.nan, dtype=np.float32),
                  subset=subset, z=np.full(n, np.nan, dtype=np.float32), verdict=verdict,
                  p_value=np.full(n, np.nan, dtype=np.float64), cluster=np.full(n, -1, dtype=np.int16),
                  text_on_device=resident,
                  summary={"transfer": {"staged": feeder.staged, "text_resident": resident is not None}})


def check_valid(s: Scores, steps) -> None:
    """Refuse data with no valid row; warn of invalid rows (global: counted over every row)."""
    n_valid = steps.count(s.valid)
    if n_valid == 0:
        raise InputError(f"{steps.path}: every row has a NaN/inf or zero-norm embedding; nothing to scan")
    n_bad = steps.total_rows - n_valid
    if n_bad:
        s.warnings.append(f"{n_bad:,} row{'s' if n_bad != 1 else ''} with NaN/inf or zero-norm embeddings "
                          "(listed in invalid.txt) took no part in any fit or verdict: re-embed them")


# -- pass 2 --------------------------------------------------------------------------------------------------
def _text_chunks(s: Scores, cfg: ScanConfig, source: ChunkSource):
    """The caption chunks of pass 2: from the device when pass 1 kept them there, else streamed again."""
    if s.text_on_device is not None:
        return s.text_on_device.chunks("text", cfg.chunk_rows)
    return ChunkFeeder(cfg.device, staged=cfg.stage_chunks).feed(source.chunks(cfg.chunk_rows, ("text",)))


def _device_seeds(captions: np.ndarray, device):
    """Seed captions on the device, checked once here (so the per-chunk calls skip the check and its sync)."""
    import torch

    seeds = torch.from_numpy(np.ascontiguousarray(captions))
    bad = int(ops.invalid_rows(seeds).sum())
    if bad:
        raise InputError(f"{bad} of {len(seeds)} seed captions have zero norm or NaN/inf values")
    return seeds.to(device)


def correlation_pass(s: Scores, corr_captions: np.ndarray, cfg: ScanConfig, source: ChunkSource, timer: Timer,
                     progress: bool) -> None:
    """z: each row's caption against the seed captions (reduced by mean, max or top-k)."""
    import torch

    t0 = time.perf_counter()
    device = torch.device(cfg.device)
    seed_t = _device_seeds(corr_captions, device)
    topk = min(cfg.topk, len(corr_captions)) if cfg.reduce == "topk" else None
    out = DeviceOutputs(source.rows, ("z",), device)
    with progress_bar("correlation", source.rows, enabled=progress) as bar, torch.no_grad():
        for chunk in _text_chunks(s, cfg, source):
            out["z"][chunk.start:chunk.stop] = ops.seed_correlation(chunk.text, seed_t, cfg.reduce, topk,
                                                                    check_seeds=False)
            bar.advance(chunk.stop - chunk.start)
    s.z = out.numpy()["z"]
    timer.add("correlation", time.perf_counter() - t0)


def cluster_correlation_pass(s: Scores, found: list, cfg: ScanConfig, source: ChunkSource, timer: Timer,
                             progress: bool) -> np.ndarray:
    """z of every row against each cluster's seed captions: (rows, clusters) float32."""
    import torch

    t0 = time.perf_counter()
    device = torch.device(cfg.device)
    out = DeviceOutputs(source.rows, ("z",), device, columns=len(found))
    seeds_t = [_device_seeds(c.seed_captions, device) for c in found]
    topks = [min(cfg.topk, len(c.seed_captions)) if cfg.reduce == "topk" else None for c in found]
    if found:
        with progress_bar("correlation", source.rows, enabled=progress) as bar, torch.no_grad():
            for chunk in _text_chunks(s, cfg, source):
                for k, (seed_t, topk) in enumerate(zip(seeds_t, topks)):
                    out["z"][chunk.start:chunk.stop, k] = ops.seed_correlation(chunk.text, seed_t, cfg.reduce, topk,
                                                                               check_seeds=False)
                bar.advance(chunk.stop - chunk.start)
    z = out.numpy()["z"]
    timer.add("correlation", time.perf_counter() - t0)
    return z
