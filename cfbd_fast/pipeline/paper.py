"""The paper's path (`cfbd-paper`, `coarse`) and the one-stage baselines: the coarse split, one seed set, one
threshold on one score. Every global step goes through `GlobalSteps` (one process or ranks: global_steps.py)."""
from __future__ import annotations

import time

import numpy as np

from ..detect import baselines, coarse, fine, seeds
from ..errors import InputError
from .global_steps import GlobalSteps
from .mapping import NULL_SAMPLE
from .options import BENIGN, SEED, SUSPICIOUS, THRESHOLD_METHODS, V_POISONED, ScanConfig
from .passes import Scores, Timer

CLASSIC_ESTIMATORS = [m for m in THRESHOLD_METHODS if m not in ("fdr", "fwer")]


# -- coarse stage and seeds -----------------------------------------------------------------------
def coarse_stage(s: Scores, cfg: ScanConfig, steps: GlobalSteps, timer: Timer) -> coarse.CoarseSplit:
    """The GMM on c (global: fitted on every valid row) and each row's posterior of its lowest component."""
    t0 = time.perf_counter()
    n_valid = steps.count(s.valid)
    if n_valid < cfg.components:
        raise InputError(f"{steps.path}: {n_valid} valid rows is fewer than --components {cfg.components}")
    gmm = steps.fit_gmm(s.c[s.valid], s.valid, k=cfg.components, seed=cfg.random_seed, device=cfg.device)
    split = coarse.split_by(gmm, s.c, s.valid, gamma=cfg.gamma, device=cfg.device)
    s.posterior = split.posterior
    s.subset[s.valid & split.benign] = BENIGN
    s.summary["gmm"] = split.gmm_summary()
    timer.add("gmm", time.perf_counter() - t0)
    return split


def seed_stage(s: Scores, cfg: ScanConfig, steps: GlobalSteps, timer: Timer) -> np.ndarray:
    """The seed set and the caption embeddings that pass 2 correlates with.

    Global: the candidates (the rows with the largest c over all rows), their captions, the null sample.
    """
    t0 = time.perf_counter()
    q = min(cfg.seed_set_size, steps.count(s.valid))
    ids, ids_c = steps.top_rows(s.c, s.valid, seeds.pool_size(q, cfg.seed_select))
    order = np.argsort(ids)
    candidates, candidate_c = ids[order], ids_c[order]
    captions = steps.fetch("text", candidates) if cfg.seed_select == "dense" else None
    s.seed_rows = seeds.select_seeds(candidates, candidate_c, captions, q, cfg.seed_select)
    steps.mark(s.subset, s.seed_rows, SEED)
    null_rows = steps.sample_valid(s.valid, NULL_SAMPLE, np.random.default_rng(cfg.random_seed))
    null_coherence = seeds.mean_pairwise_cosine(steps.fetch("text", null_rows))
    seed_captions = steps.fetch("text", s.seed_rows)
    s.summary["cluster"] = {"found": True, "reason": "the paper's method has no cluster test",
                            "seed_rows": len(s.seed_rows), "null_coherence": null_coherence,
                            "cluster_coherence": seeds.mean_pairwise_cosine(seed_captions)}
    timer.add("seeds", time.perf_counter() - t0)
    return seed_captions


# -- verdicts ------------------------------------------------------------------------------------------------
def paper_verdict(s: Scores, split: coarse.CoarseSplit, cfg: ScanConfig, steps: GlobalSteps, timer: Timer) -> dict:
    """Score, threshold and verdict of cfbd-paper and coarse; returns the threshold summary.

    Global: the threshold estimates, the null and the error-controlled cut.
    """
    t0 = time.perf_counter()
    rule = cfg.spec.verdict
    null = None  # the normal null of the p-values, when the cut is error-controlled
    if rule == "coarse":  # every row that is not confidently benign; c is the ranking
        s.score, thr, estimates = s.c.copy(), float("nan"), {}
        s.verdict[(s.subset == SEED) | (s.subset == SUSPICIOUS)] = V_POISONED
    else:
        s.score = fine.fine_score(s.z, s.s_o, cfg.score)
        s.score[~s.valid] = np.nan
        estimates = {m: steps.estimate(s.score, m, reference=s.valid & split.benign, fpr=cfg.fpr,
                                       seed=cfg.random_seed) for m in CLASSIC_ESTIMATORS}
        if cfg.threshold is not None:
            thr = cfg.threshold
        elif cfg.threshold_method in CLASSIC_ESTIMATORS:
            thr = estimates[cfg.threshold_method]
        else:  # an error-controlled cut on p-values, expressed as a score threshold
            s.p_value, null = steps.null_pvalues(s.score, s.valid)
            level = cfg.fdr if cfg.threshold_method == "fdr" else cfg.alpha
            reject, _ = steps.control(cfg.threshold_method, s.p_value[s.valid], level)
            if steps.count(reject):
                thr = steps.lowest(s.score[s.valid][reject]) - 1e-7
            else:
                thr = steps.highest(s.score[~np.isnan(s.score)])
            estimates[cfg.threshold_method] = thr
        steps.mark(s.verdict, s.seed_rows, V_POISONED)  # the paper's rule
        s.verdict[(s.subset == SUSPICIOUS) & (s.score > thr)] = V_POISONED
    timer.add("verdict", time.perf_counter() - t0)
    return {"value": thr, "method": "given" if cfg.threshold is not None else cfg.threshold_method,
            "estimates": estimates, "score": cfg.score, **({"null": null} if null else {})}


def baseline_verdict(s: Scores, cfg: ScanConfig, steps: GlobalSteps, timer: Timer) -> dict:
    """Score, threshold and verdict of the one-stage baselines (cosine, safeclip).

    Global: the null quantile (cosine), the GMM on s_o (safeclip).
    """
    t0 = time.perf_counter()
    if cfg.method == "cosine":
        score = baselines.cosine_score(s.s_o)
        estimates = {"null-quantile": steps.estimate(score, "null-quantile", reference=s.valid, fpr=cfg.fpr,
                                                     seed=cfg.random_seed)}
        thr = cfg.threshold if cfg.threshold is not None else estimates["null-quantile"]
        method = "null-quantile"
    else:  # safeclip: flag a posterior of the safe component below 0.9
        gmm = steps.fit_gmm(s.s_o[s.valid].astype(np.float64), s.valid, k=2, seed=cfg.random_seed)
        score, s.summary["gmm"] = baselines.safeclip_score(s.s_o, s.valid, gmm=gmm)
        thr = cfg.threshold if cfg.threshold is not None else 1.0 - 0.9
        estimates, method = {}, "posterior"
    s.verdict[s.valid & (score > thr)] = V_POISONED
    s.score = score.astype(np.float32)
    s.score[~s.valid] = np.nan
    timer.add("verdict", time.perf_counter() - t0)
    return {"value": thr, "method": "given" if cfg.threshold is not None else method, "estimates": estimates,
            "score": cfg.method}
