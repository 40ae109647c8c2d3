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
from ..detect import baselines, clusters as clusters_mod, coarse, fine, seeds, threshold
from ..errors import InputError
from ..progress import progress_bar
from ..provenance import file_digest, text_digest
from .options import (BENIGN, INVALID, SEED, SUSPICIOUS, THRESHOLD_METHODS, V_BENIGN, V_INVALID, V_POISONED,
                      ScanConfig)
from .source import ChunkSource
CLASSIC_ESTIMATORS = [m for m in THRESHOLD_METHODS if m not in ("fdr", "fwer")]
NULL_SAMPLE = 2000  # random valid rows whose caption/image coherence is the "unrelated rows" reference
FIT_SAMPLE = 20_000  # random valid rows on which the mapper's fit and each cluster's grounding are measured


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
                  subset=subset, z=np.full(n, np.nan, dtype=np.float32), verdict=verdict,
                  p_value=np.full(n, np.nan, dtype=np.float64), cluster=np.full(n, -1, dtype=np.int16))


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
    corr_captions = seed_captions
    info = {"found": True, "reason": "the paper's method has no cluster test"}
    s.summary["cluster"] = {**info, "seed_rows": len(s.seed_rows), "null_coherence": null_coherence,
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


# -- every cluster examined (the cfbd method) ----------------------------------------------------------------
@dataclass
class Reference:
    """Random valid rows that stand for "unrelated pairs": caption/image coherence, the mapper's fit."""
    captions: np.ndarray
    images: np.ndarray
    generated: np.ndarray
    caption_coherence: float
    image_coherence: float


def reference_sample(s: Scores, mapper, cfg: ScanConfig, source: ChunkSource) -> Reference:
    """A random sample of valid rows with F(I); records how much better F(I) predicts T than I does."""
    import torch

    rng = np.random.default_rng(cfg.random_seed)
    rows = np.sort(rng.choice(np.flatnonzero(s.valid), size=min(FIT_SAMPLE, int(s.valid.sum())), replace=False))
    captions, images = source.gather("text", rows), source.gather("image", rows)
    with torch.no_grad():
        generated = mapper.map(torch.from_numpy(images).to(cfg.device), rows).float().cpu().numpy()
    t, i, g = (seeds.normalize_rows(x) for x in (captions, images, generated))
    by_mapper = float(np.median(np.sum(g * t, axis=1)))
    by_image = float(np.median(np.sum(i * t, axis=1)))
    by_mean = float(np.median(t @ seeds.normalize_rows(t.mean(axis=0, keepdims=True))[0]))
    fit = {"median_cos_generated_caption": by_mapper, "median_cos_image_caption": by_image,
           "median_cos_mean_caption": by_mean, "gain_over_mean_caption": by_mapper - by_mean, "rows": len(rows)}
    s.summary["mapper_fit"] = fit
    if by_mapper - by_mean < 0.02:
        s.warnings.append(f"the mapping network explains almost nothing: its captions F(I) match the real captions "
                          f"(median cosine {by_mapper:.3f}) no better than the average caption does ({by_mean:.3f}); "
                          "c then measures noise: train a mapper on clean pairs of this embedding model")
    null = slice(0, min(NULL_SAMPLE, len(rows)))
    return Reference(captions=captions, images=images, generated=generated,
                     caption_coherence=seeds.mean_pairwise_cosine(captions[null]),
                     image_coherence=seeds.mean_pairwise_cosine(images[null]))


def cluster_stage(s: Scores, ref: Reference, cfg: ScanConfig, source: ChunkSource, timer: Timer) -> list:
    """The seed pool's caption clusters, each with its statistics; marks their seeds."""
    t0 = time.perf_counter()
    q = min(cfg.seed_set_size, int(s.valid.sum()))
    pool = seeds.candidate_rows(s.c, s.valid, q, "dense")
    pool_captions = source.gather("text", pool)
    found = clusters_mod.caption_clusters(pool, pool_captions, ref.caption_coherence,
                                          min_members=min(cfg.min_cluster, q), min_relative=cfg.cluster_min_relative)
    rng = np.random.default_rng(cfg.random_seed + 1)
    valid_c = s.c[s.valid]
    c_median, c_scale = float(np.median(valid_c)), float(np.median(np.abs(valid_c - np.median(valid_c)))) * 1.4826
    for cluster in found:
        captions = pool_captions[_positions(pool, cluster.rows)]
        images = source.gather("image", cluster.rows)
        caption_coh = seeds.mean_pairwise_cosine(captions)
        image_coh, image_z = clusters_mod.coherence_z(images, ref.images[:NULL_SAMPLE], rng)
        cluster.stats = {
            "size": int(len(cluster.rows)),
            "caption_coherence": caption_coh,
            "relative_caption_coherence": float(fine.relative_coherence(caption_coh, ref.caption_coherence)),
            "image_coherence": image_coh,
            "relative_image_coherence": float(fine.relative_coherence(image_coh, ref.image_coherence)),
            "image_coherence_z": image_z,
            "grounding": clusters_mod.grounding(captions.mean(axis=0), ref.generated),
            "median_c": float(np.median(s.c[cluster.rows])),
            "c_z": (float(np.median(s.c[cluster.rows])) - c_median) / max(c_scale, 1e-9),
            "median_s_o": float(np.median(s.s_o[cluster.rows])),
        }
        cluster.centroid = captions[: cfg.seed_set_size]
    # Duplicate families (near-identical images under one caption) are set aside before pass 2; of the rest, the
    # clusters whose pairs are the least consistent are tested: a backdoor's captions do not fit its images.
    is_duplicate = [cl.stats["relative_image_coherence"] >= cfg.cluster_min_relative for cl in found]
    duplicate = [cl for cl, dup in zip(found, is_duplicate) if dup]
    rest = sorted((cl for cl, dup in zip(found, is_duplicate) if not dup),
                  key=lambda cl: (-cl.stats["median_c"], int(cl.rows[0])))
    s.summary["clusters_set_aside"] = (
        [_set_aside(cl, "its images are near-identical too: a duplicate family, not a trigger", source)
         for cl in duplicate] +
        [_set_aside(cl, f"not tested: more consistent than the {cfg.max_clusters} clusters tested (--max-clusters)",
                    source) for cl in rest[cfg.max_clusters:]])
    tested = rest[:cfg.max_clusters]
    s.seed_rows = np.concatenate([c.seed_rows(cfg.seed_set_size) for c in tested]) if tested else \
        np.zeros(0, dtype=np.int64)
    s.subset[s.seed_rows] = SEED
    timer.add("seeds", time.perf_counter() - t0)
    return tested


def _caption_of(source: ChunkSource, row: int) -> str | None:
    if "caption" not in source.meta.column_names:
        return None
    return source.meta.column("caption")[int(row)].as_py()


def _set_aside(cluster, reason: str, source: ChunkSource) -> dict:
    return {"caption": _caption_of(source, cluster.rows[0]), **cluster.stats, "backdoor": False, "reason": reason}


def cluster_correlation_pass(s: Scores, found: list, cfg: ScanConfig, source: ChunkSource, timer: Timer,
                             progress: bool) -> np.ndarray:
    """z of every row against each cluster's seed captions: (rows, clusters) float32."""
    import torch

    t0 = time.perf_counter()
    device = torch.device(cfg.device)
    z = np.full((source.rows, len(found)), np.nan, dtype=np.float32)
    seeds_t = [torch.from_numpy(np.ascontiguousarray(c.centroid)).to(device) for c in found]
    topks = [min(cfg.topk, len(c.centroid)) if cfg.reduce == "topk" else None for c in found]
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


INCONSISTENCY_Z = 3.09  # one-sided 0.001: the cluster's pairs fit their images worse than the bulk's do


def is_backdoor(stats: dict, cfg: ScanConfig) -> tuple[bool, str, dict]:
    """A cluster's verdict from its measured statistics, the reason, and its margin from each boundary.

    A backdoor cluster has enough rows significant for it, its pairs are inconsistent with their images under
    the mapper (their c lies above the bulk's; a genuine group sharing a caption that describes its images is
    consistent), and its images are not near-identical (that is a duplicate family).
    """
    margins = {"significant_rows": stats["significant_rows"] - cfg.min_cluster,
               "inconsistency_z": stats["inconsistency_z"] - INCONSISTENCY_Z,
               "relative_image_coherence": cfg.cluster_min_relative - stats["relative_image_coherence"]}
    if margins["significant_rows"] < 0:
        return False, f"only {stats['significant_rows']} rows are significant for it (need {cfg.min_cluster})", margins
    if not margins["inconsistency_z"] >= 0:
        return False, (f"its pairs are consistent with their images (c {stats['inconsistency_z']:.1f} standard "
                       f"errors above the bulk, need {INCONSISTENCY_Z}): a genuine group sharing a caption"), margins
    return True, (f"{stats['significant_rows']} rows share its caption over unrelated images that it does not "
                  "describe"), margins


def inconsistency_z(c_rows: np.ndarray, c_valid: np.ndarray) -> float:
    """How far the median c of some rows lies above the median of all, in standard errors of a median."""
    if len(c_rows) == 0:
        return float("nan")
    median = float(np.median(c_valid))
    sigma = max(float(np.median(np.abs(c_valid - median))) * 1.4826, 1e-9)
    return (float(np.median(c_rows)) - median) / (1.2533 * sigma / np.sqrt(len(c_rows)))


def _significant(scores: np.ndarray, valid: np.ndarray, cfg: ScanConfig) -> tuple[np.ndarray, np.ndarray,
                                                                              np.ndarray, dict]:
    """Which rows are significant for which of the score columns: (reject, best column, p-value, cut info).

    With `fdr`/`fwer`, each column gets p-values under its own robust null; a row's p-value is its smallest,
    times the number of columns (Bonferroni over the clusters); one Benjamini-Hochberg (or Bonferroni) cut over
    all valid rows follows. With a classic estimator or a given threshold, a row is significant when its score
    is above its column's threshold.
    """
    n, k = scores.shape
    rows = np.arange(n)
    if cfg.threshold_method in ("fdr", "fwer") and cfg.threshold is None:
        pvals, nulls = zip(*(threshold.null_pvalues(scores[:, j], valid) for j in range(k)))
        pvals = np.stack(pvals, axis=1)
        best = np.argmin(pvals, axis=1)
        p = np.minimum(1.0, k * pvals[rows, best])
        p[~valid] = np.nan
        control = threshold.benjamini_hochberg if cfg.threshold_method == "fdr" else threshold.family_wise
        level = cfg.fdr if cfg.threshold_method == "fdr" else cfg.alpha
        reject = np.zeros(n, dtype=bool)
        reject[valid], cut = control(p[valid], level)
        return reject, best, p, {"level": level, "p_cut": cut, "nulls": list(nulls)}
    estimates = [cfg.threshold if cfg.threshold is not None else
                 threshold.estimate(scores[:, j], cfg.threshold_method, reference=valid, fpr=cfg.fpr,
                                    seed=cfg.random_seed) for j in range(k)]
    margin = scores - np.asarray(estimates, dtype=np.float32)[None, :]
    best = np.argmax(np.where(np.isnan(margin), -np.inf, margin), axis=1)
    reject = valid & (margin[rows, best] > 0)
    return reject, best, np.full(n, np.nan), {"estimates": estimates}


def clusters_verdict(s: Scores, found: list, z: np.ndarray, cfg: ScanConfig, source: ChunkSource,
                     timer: Timer) -> dict:
    """Each cluster's verdict from its statistics, then the rows: those significant for a backdoor cluster.

    Step 1 tests every row against every cluster (Bonferroni over the clusters) to count each cluster's
    significant rows and measure them. Step 2 tests the rows again against the backdoor clusters alone, so that
    the clusters set aside do not dilute the error control of the verdict. Returns the threshold summary.
    """
    t0 = time.perf_counter()
    n_clusters = len(found)
    s.score = np.full(source.rows, np.nan, dtype=np.float32)
    info = {"method": cfg.threshold_method if cfg.threshold is None else "given", "score": cfg.score,
            "clusters_tested": n_clusters}
    if n_clusters == 0:
        s.summary["clusters"] = []
        s.summary["cluster"] = {"found": False, "reason": "no caption cluster among the rows with the largest c"}
        timer.add("verdict", time.perf_counter() - t0)
        return {**info, "value": float("nan")}
    valid = s.valid
    scores = np.stack([fine.fine_score(z[:, k], s.s_o, cfg.score) for k in range(n_clusters)], axis=1)
    scores[~valid] = np.nan
    reject, best, p, cut = _significant(scores, valid, cfg)
    report = []
    backdoor = np.zeros(n_clusters, dtype=bool)
    c_valid = s.c[valid]
    for k, cluster in enumerate(found):
        mine = reject & (best == k)
        stats = {**cluster.stats, "significant_rows": int(mine.sum()),
                 "inconsistency_z": inconsistency_z(s.c[mine], c_valid)}
        backdoor[k], reason, margins = is_backdoor(stats, cfg)
        stats["margins"] = margins
        if backdoor[k] and min(margins["significant_rows"] / max(cfg.min_cluster, 1),
                               margins["inconsistency_z"] / INCONSISTENCY_Z,
                               margins["relative_image_coherence"] / cfg.cluster_min_relative) < 0.2:
            s.warnings.append(f"cluster {k} is judged a backdoor by a narrow margin ({margins}): check its rows in "
                              "flagged.csv")
        report.append({"cluster": k, "caption": _caption_of(source, cluster.rows[0]), "seed_rows": cluster.seed_rows(cfg.seed_set_size).tolist(),
                       **stats, "backdoor": bool(backdoor[k]), "reason": reason})
    accepted = np.flatnonzero(backdoor)
    if len(accepted):
        s.seed_rows = np.concatenate([found[k].seed_rows(cfg.seed_set_size) for k in accepted])
        reject, best_accepted, p, cut = _significant(scores[:, accepted], valid, cfg)
        best = accepted[best_accepted]
        s.verdict[reject] = V_POISONED
    s.p_value = p
    s.cluster[valid] = best[valid].astype(np.int16)
    rows = np.arange(source.rows)
    s.z = z[rows, best].astype(np.float32)
    s.score = scores[rows, best].astype(np.float32)
    s.summary["clusters"] = report
    s.summary["cluster"] = {"found": bool(len(accepted)), "clusters_examined": n_clusters,
                            "backdoor_clusters": accepted.tolist(),
                            "reason": "; ".join(f"cluster {r['cluster']}: {r['reason']}" for r in report)}
    timer.add("verdict", time.perf_counter() - t0)
    return {**info, **cut}
