"""The paper's path (`cfbd-paper`, `coarse`) and the one-stage baselines: the coarse split, one seed set, one
threshold on one score."""
from __future__ import annotations

import time

import numpy as np

from ..detect import baselines, coarse, fine, seeds, threshold
from ..errors import InputError
from .mapping import NULL_SAMPLE
from .options import BENIGN, SEED, SUSPICIOUS, THRESHOLD_METHODS, V_POISONED, ScanConfig
from .passes import Scores, Timer
from .source import ChunkSource

CLASSIC_ESTIMATORS = [m for m in THRESHOLD_METHODS if m not in ("fdr", "fwer")]


# -- coarse stage and seeds -----------------------------------------------------------------------
def coarse_stage(s: Scores, cfg: ScanConfig, source: ChunkSource, timer: Timer) -> coarse.CoarseSplit:
    t0 = time.perf_counter()
    n_valid = int(s.valid.sum())
    if n_valid < cfg.components:
        raise InputError(f"{source.path}: {n_valid} valid rows is fewer than --components {cfg.components}")
    split = coarse.coarse_split(s.c, s.valid, k=cfg.components, gamma=cfg.gamma, seed=cfg.random_seed,
                                device=cfg.device)
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
    s.summary["cluster"] = {"found": True, "reason": "the paper's method has no cluster test",
                            "seed_rows": len(s.seed_rows), "null_coherence": null_coherence,
                            "cluster_coherence": seeds.mean_pairwise_cosine(seed_captions)}
    timer.add("seeds", time.perf_counter() - t0)
    return seed_captions


# -- verdicts ------------------------------------------------------------------------------------------------
def paper_verdict(s: Scores, split: coarse.CoarseSplit, cfg: ScanConfig, timer: Timer) -> dict:
    """Score, threshold and verdict of cfbd-paper and coarse; returns the threshold summary."""
    t0 = time.perf_counter()
    rule = cfg.spec.verdict
    null = None  # the normal null of the p-values, when the cut is error-controlled
    if rule == "coarse":  # every row that is not confidently benign; c is the ranking
        s.score, thr, estimates = s.c.copy(), float("nan"), {}
        s.verdict[(s.subset == SEED) | (s.subset == SUSPICIOUS)] = V_POISONED
    else:
        s.score = fine.fine_score(s.z, s.s_o, cfg.score)
        s.score[~s.valid] = np.nan
        estimates = threshold.all_estimates(s.score, CLASSIC_ESTIMATORS, reference=s.valid & split.benign,
                                            fpr=cfg.fpr, seed=cfg.random_seed)
        if cfg.threshold is not None:
            thr = cfg.threshold
        elif cfg.threshold_method in CLASSIC_ESTIMATORS:
            thr = estimates[cfg.threshold_method]
        else:  # an error-controlled cut on p-values, expressed as a score threshold
            s.p_value, null = threshold.null_pvalues(s.score, s.valid)
            control = threshold.benjamini_hochberg if cfg.threshold_method == "fdr" else threshold.family_wise
            reject, _ = control(s.p_value[s.valid], cfg.fdr if cfg.threshold_method == "fdr" else cfg.alpha)
            thr = float(np.min(s.score[s.valid][reject])) - 1e-7 if reject.any() else float(np.nanmax(s.score))
            estimates[cfg.threshold_method] = thr
        s.verdict[s.seed_rows] = V_POISONED  # the paper's rule
        s.verdict[(s.subset == SUSPICIOUS) & (s.score > thr)] = V_POISONED
    timer.add("verdict", time.perf_counter() - t0)
    return {"value": thr, "method": "given" if cfg.threshold is not None else cfg.threshold_method,
            "estimates": estimates, "score": cfg.score, **({"null": null} if null else {})}


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


