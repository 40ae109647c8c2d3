"""The scan's two streamed passes over the store, and the per-row arrays they fill.

Pass 1 maps each chunk's images with F and computes s_o, s_g and c; pass 2 correlates each chunk's captions with
seed captions. Everything between the passes works on the arrays in `Scores`.
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


class Timer:
    """Wall time per stage; synchronises CUDA before reading the clock."""

    def __init__(self, device: str):
        self.stages: dict[str, float] = {}
        self._cuda = str(device).startswith("cuda")

    def sync(self) -> None:
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


# -- pass 1 --------------------------------------------------------------------------------------------------
def consistency_pass(source: ChunkSource, mapper, cfg: ScanConfig, timer: Timer, progress: bool) -> Scores:
    """s_o, s_g and c for every row (NaN for rows with NaN/inf or zero-norm vectors: the kernels mark them)."""
    import torch

    n, device = source.rows, torch.device(cfg.device)
    needs_mapper = cfg.spec.needs_mapper
    s_o = np.empty(n, dtype=np.float32)
    s_g = np.full(n, np.nan, dtype=np.float32)
    c = np.full(n, np.nan, dtype=np.float32)
    with progress_bar("consistency", n, enabled=progress) as bar, torch.no_grad():
        for chunk in source.chunks(cfg.chunk_rows, ("image", "text")):
            lo, hi = chunk.start, chunk.stop
            t0 = time.perf_counter()
            img = ops.as_tensor(chunk.image, "image").to(device, non_blocking=True)
            txt = ops.as_tensor(chunk.text, "text").to(device, non_blocking=True)
            timer.sync()
            timer.add("read", time.perf_counter() - t0)
            gen = txt  # baselines need s_o only
            if needs_mapper:
                t0 = time.perf_counter()
                gen = mapper.map(img.float(), np.arange(lo, hi))
                timer.sync()
                timer.add("mapper", time.perf_counter() - t0)
            t0 = time.perf_counter()
            cc, so, sg = ops.consistency(img, txt, gen)
            s_o[lo:hi] = so.cpu().numpy()
            if needs_mapper:
                s_g[lo:hi] = sg.cpu().numpy()
                c[lo:hi] = cc.cpu().numpy()
            timer.add("consistency", time.perf_counter() - t0)
            bar.advance(hi - lo)
    valid = ~np.isnan(c) if needs_mapper else ~np.isnan(s_o)
    if not valid.any():
        raise InputError(f"{source.path}: every row has a NaN/inf or zero-norm embedding; nothing to scan")
    warnings = []
    if not valid.all():
        n_bad = int((~valid).sum())
        warnings.append(f"{n_bad:,} row{'s' if n_bad != 1 else ''} with NaN/inf or zero-norm embeddings "
                        "(listed in invalid.txt) took no part in any fit or verdict: re-embed them")
    subset = np.full(n, SUSPICIOUS, dtype=np.int8)
    subset[~valid] = INVALID
    verdict = np.full(n, V_BENIGN, dtype=np.int8)
    verdict[~valid] = V_INVALID
    return Scores(s_o=s_o, s_g=s_g, c=c, valid=valid, posterior=np.full(n, np.nan, dtype=np.float32),
                  subset=subset, z=np.full(n, np.nan, dtype=np.float32), verdict=verdict,
                  p_value=np.full(n, np.nan, dtype=np.float64), cluster=np.full(n, -1, dtype=np.int16),
                  warnings=warnings)


# -- pass 2 --------------------------------------------------------------------------------------------------
def correlation_pass(s: Scores, corr_captions: np.ndarray, cfg: ScanConfig, source: ChunkSource, timer: Timer,
                     progress: bool) -> None:
    """z: each row's caption against the seed captions (reduced by mean, max or top-k)."""
    import torch

    t0 = time.perf_counter()
    device = torch.device(cfg.device)
    seed_t = torch.from_numpy(corr_captions).to(device)
    topk = min(cfg.topk, len(corr_captions)) if cfg.reduce == "topk" else None
    with progress_bar("correlation", source.rows, enabled=progress) as bar, torch.no_grad():
        for chunk in source.chunks(cfg.chunk_rows, ("text",)):
            txt = ops.as_tensor(chunk.text, "text").to(device, non_blocking=True)
            zz = ops.seed_correlation(txt, seed_t, cfg.reduce, topk)
            s.z[chunk.start:chunk.stop] = zz.cpu().numpy()
            bar.advance(chunk.stop - chunk.start)
    timer.sync()
    timer.add("correlation", time.perf_counter() - t0)


def cluster_correlation_pass(s: Scores, found: list, cfg: ScanConfig, source: ChunkSource, timer: Timer,
                             progress: bool) -> np.ndarray:
    """z of every row against each cluster's seed captions: (rows, clusters) float32."""
    import torch

    t0 = time.perf_counter()
    device = torch.device(cfg.device)
    z = np.full((source.rows, len(found)), np.nan, dtype=np.float32)
    seeds_t = [torch.from_numpy(np.ascontiguousarray(c.seed_captions)).to(device) for c in found]
    topks = [min(cfg.topk, len(c.seed_captions)) if cfg.reduce == "topk" else None for c in found]
    if found:
        with progress_bar("correlation", source.rows, enabled=progress) as bar, torch.no_grad():
            for chunk in source.chunks(cfg.chunk_rows, ("text",)):
                txt = ops.as_tensor(chunk.text, "text").to(device, non_blocking=True)
                for k, (seed_t, topk) in enumerate(zip(seeds_t, topks)):
                    z[chunk.start:chunk.stop, k] = ops.seed_correlation(txt, seed_t, cfg.reduce, topk).cpu().numpy()
                bar.advance(chunk.stop - chunk.start)
    timer.sync()
    timer.add("correlation", time.perf_counter() - t0)
    return z


