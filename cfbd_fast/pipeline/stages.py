"""The scan's stages in order; each is a function of arrays and the validated config.

mapper -> consistency (pass 1) -> coarse split (GMM) -> seed selection -> cluster test -> correlation (pass 2)
-> fine score -> threshold -> verdict. Only `resolve_mapper`, `consistency_pass`, `gather` and
`correlation_pass` touch the ChunkSource; everything else is in `cfbd_fast.detect` on plain arrays.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import ops
from ..detect import baselines, coarse, fine, seeds, threshold
from ..errors import InputError
from ..progress import progress_bar
from ..provenance import file_digest, text_digest
from .options import (BENIGN, INVALID, SEED, SUSPICIOUS, THRESHOLD_METHODS, V_BENIGN, V_INVALID, V_POISONED,
                      ScanConfig)
from .source import ChunkSource
NULL_SAMPLE = 2000  # random valid rows whose caption/image coherence is the "unrelated rows" reference


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
    seed_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    summary: dict = field(default_factory=dict)


# -- mapper --------------------------------------------------------------------------------------------------
def resolve_mapper(mapper, source: ChunkSource, cfg: ScanConfig, progress: bool):
    """A mapper object from a file path, "self", "knn" or an object with .map(); and its fingerprint.

    Self-fit and kNN mappers see only valid rows of a random sample, read here as arrays.
    """
    from .. import mapper as mapper_mod

    name = str(mapper) if isinstance(mapper, (str, Path)) else None
    if name == "self":
        rows, (image, text) = source.sample_valid(cfg.self_sample, cfg.random_seed, ("image", "text"))
        if len(rows) < 2:
            raise InputError(f"{source.path}: fewer than 2 valid rows to fit --mapper self on")
        m = mapper_mod.fit_self_mapper(image, text, sample=len(rows), seed=cfg.random_seed, device=cfg.device,
                                       progress=progress, **source.embedding_model, **cfg.self_options)
        return m, "self:" + text_digest(m.config)
    if name == "knn":
        rows, (text,) = source.sample_valid(cfg.knn_bank, cfg.random_seed, ("text",))
        if len(rows) < 2:
            raise InputError(f"{source.path}: fewer than 2 valid captions for the --mapper knn bank")
        m = mapper_mod.KnnMapper(text, rows, k=min(cfg.knn_neighbours, len(rows) - 1), **source.embedding_model)
        return m, "knn:" + text_digest(m.config)
    if name is not None:
        path = Path(mapper)
        m = mapper_mod.load_mapper(path, expect_model=source.identity["model"], expect_dim=source.dim)
        return m, "file:" + file_digest(path)
    return mapper, "object:" + text_digest(getattr(mapper, "config", {}))


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
    subset = np.full(n, SUSPICIOUS, dtype=np.int8)
    subset[~valid] = INVALID
    verdict = np.full(n, V_BENIGN, dtype=np.int8)
    verdict[~valid] = V_INVALID
    return Scores(s_o=s_o, s_g=s_g, c=c, valid=valid, posterior=np.full(n, np.nan, dtype=np.float32),
                  subset=subset, z=np.full(n, np.nan, dtype=np.float32), verdict=verdict)


# -- coarse stage, seeds, cluster test -----------------------------------------------------------------------
def coarse_stage(s: Scores, cfg: ScanConfig, source: ChunkSource, timer: Timer) -> coarse.CoarseSplit:
    t0 = time.perf_counter()
    n_valid = int(s.valid.sum())
    if n_valid < cfg.components:
        raise InputError(f"{source.path}: {n_valid} valid rows is fewer than --components {cfg.components}")
    split = coarse.coarse_split(s.c, s.valid, k=cfg.components, gamma=cfg.gamma, seed=cfg.random_seed)
    s.posterior = split.posterior
    s.subset[s.valid & split.benign] = BENIGN
    s.summary["gmm"] = split.gmm_summary()
    timer.add("gmm", time.perf_counter() - t0)
    return split


def seed_stage(s: Scores, cfg: ScanConfig, source: ChunkSource, timer: Timer) -> np.ndarray:
    """The seed set and the caption embeddings that pass 2 correlates with (the backdoor cluster's, for cfbd)."""
    t0 = time.perf_counter()
    n_valid = int(s.valid.sum())
    q = min(cfg.seed_set_size, n_valid)
    candidates = seeds.candidate_rows(s.c, s.valid, q, cfg.seed_select)
    captions = source.gather("text", candidates) if cfg.seed_select == "dense" else None
    s.seed_rows = seeds.select_seeds(candidates, s.c, captions, q, cfg.seed_select)
    s.subset[s.seed_rows] = SEED
    rng = np.random.default_rng(cfg.random_seed)
    null_rows = np.sort(rng.choice(np.flatnonzero(s.valid), size=min(NULL_SAMPLE, n_valid), replace=False))
    null_coherence = seeds.mean_pairwise_cosine(source.gather("text", null_rows))
    seed_captions = source.gather("text", s.seed_rows)
    if cfg.spec.verdict == "clusters":
        cluster_rows, info = fine.find_backdoor_cluster(
            s.seed_rows, seed_captions, source.gather("image", s.seed_rows), null_coherence,
            seeds.mean_pairwise_cosine(source.gather("image", null_rows)),
            min_members=min(cfg.min_cluster, cfg.seed_set_size), max_relative=cfg.cluster_min_relative)
    else:
        cluster_rows, info = s.seed_rows, {"found": True, "reason": "the paper's method has no cluster test"}
    corr_rows = cluster_rows if len(cluster_rows) else s.seed_rows
    corr_captions = seed_captions[_positions(s.seed_rows, corr_rows)]
    s.summary["cluster"] = {**info, "seed_rows": len(s.seed_rows), "cluster_rows": len(cluster_rows),
                            "null_coherence": null_coherence,
                            "cluster_coherence": seeds.mean_pairwise_cosine(corr_captions)}
    timer.add("seeds", time.perf_counter() - t0)
    return corr_captions


def _positions(rows: np.ndarray, subset_rows: np.ndarray) -> np.ndarray:
    """Positions in `rows` of each of `subset_rows` (all present)."""
    order = np.argsort(rows, kind="stable")
    return order[np.searchsorted(rows, subset_rows, sorter=order)]


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


# -- verdicts ------------------------------------------------------------------------------------------------
def cfbd_verdict(s: Scores, split: coarse.CoarseSplit, cfg: ScanConfig, timer: Timer) -> dict:
    """Score, threshold and verdict of the CFBD methods; returns the threshold summary."""
    t0 = time.perf_counter()
    rule = cfg.spec.verdict
    if rule == "coarse":  # every row that is not confidently benign; c is the ranking
        s.score, thr, estimates = s.c.copy(), float("nan"), {}
        s.verdict[(s.subset == SEED) | (s.subset == SUSPICIOUS)] = V_POISONED
    else:
        s.score = fine.fine_score(s.z, s.s_o, cfg.score)
        s.score[~s.valid] = np.nan
        estimates = threshold.all_estimates(s.score, THRESHOLD_METHODS, reference=s.valid & split.benign,
                                            fpr=cfg.fpr, seed=cfg.random_seed)
        thr = cfg.threshold if cfg.threshold is not None else estimates[cfg.threshold_method]
        if rule == "paper":
            s.verdict[s.seed_rows] = V_POISONED
            s.verdict[(s.subset == SUSPICIOUS) & (s.score > thr)] = V_POISONED
        elif s.summary["cluster"]["found"]:
            s.verdict[s.valid & (s.score > thr)] = V_POISONED
    timer.add("verdict", time.perf_counter() - t0)
    return {"value": thr, "method": "given" if cfg.threshold is not None else cfg.threshold_method,
            "estimates": estimates, "score": cfg.score}


def baseline_verdict(s: Scores, cfg: ScanConfig, timer: Timer) -> dict:
    """Score, threshold and verdict of the one-stage baselines (cosine, safeclip)."""
    t0 = time.perf_counter()
    if cfg.method == "cosine":
        score = baselines.cosine_score(s.s_o)
        estimates = {"null-quantile": threshold.null_quantile(score, s.valid, cfg.fpr)}
        thr = cfg.threshold if cfg.threshold is not None else estimates["null-quantile"]
        method = "null-quantile"
    else:  # safeclip: flag a posterior of the safe component below 0.9
        score, s.summary["gmm"] = baselines.safeclip_score(s.s_o, s.valid, seed=cfg.random_seed)
        thr = cfg.threshold if cfg.threshold is not None else 1.0 - 0.9
        estimates, method = {}, "posterior"
    s.verdict[s.valid & (score > thr)] = V_POISONED
    s.score = score.astype(np.float32)
    s.score[~s.valid] = np.nan
    timer.add("verdict", time.perf_counter() - t0)
    return {"value": thr, "method": "given" if cfg.threshold is not None else method, "estimates": estimates,
            "score": cfg.method}
