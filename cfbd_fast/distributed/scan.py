"""The scan across ranks: each rank streams its own rows through the same passes as a single process, and every
global decision (the GMM, the seed pool, the caption clusters, the nulls, the cuts) is made identically on every
rank from all-reduced statistics or small shared arrays, so the verdicts and scores are a single process's.

Each rank holds O(its rows) per-row arrays plus O(seed pool + reference sample) shared rows; no rank gathers the
dataset. docs/scaling.md gives the cost model.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..detect import baselines, clusters as clusters_mod, coarse, fine, seeds
from ..errors import InputError
from ..pipeline import passes
from ..pipeline.clusters import INCONSISTENCY_Z, ONE_CAPTION_SHARE, SPLIT_SHARE, _positions, is_backdoor
from ..pipeline.mapping import FIT_SAMPLE, NULL_SAMPLE, Reference
from ..pipeline.options import (BENIGN, SEED, SUBSETS, SUSPICIOUS, THRESHOLD_METHODS, V_POISONED, VERDICTS,
                                ScanConfig)
from . import select, threshold as dthr
from .comm import Comm, test_hook
from .gmm import fit_gmm_sharded
from .publish import publish
from .rows import RankRows

SUPPORTED_METHODS = ("cfbd", "cfbd-paper", "coarse", "cosine", "safeclip")
CLASSIC_ESTIMATORS = [m for m in THRESHOLD_METHODS if m not in ("fdr", "fwer")]


class Shared:
    """The global steps' helpers: counts, global positions, and the few rows every rank needs, fetched from
    the ranks that hold them."""

    def __init__(self, comm: Comm, part: RankRows):
        self.comm, self.part = comm, part
        self.c_location = None

    def count(self, mask: np.ndarray) -> int:
        return int(self.comm.sum(np.array([int(np.count_nonzero(mask))], dtype=np.int64), "count rows")[0])

    def positions(self, mask: np.ndarray) -> list[tuple[int, int, int]]:
        """Where this rank's rows under `mask` lie in the global order of all ranks' masked rows:
        (global position, position among this rank's masked rows, length), one per segment."""
        segs = self.part.segments
        counts = [int(np.count_nonzero(mask[s.local_start:s.local_start + len(s)])) for s in segs]
        every = sorted(x for rank in self.comm.gather_objects([(s.global_start, c) for s, c in zip(segs, counts)],
                                                              "segment counts") for x in rank)
        offset, start_of = 0, {}
        for global_start, c in every:
            start_of[global_start] = offset
            offset += c
        out, local = [], 0
        for s, c in zip(segs, counts):
            out.append((start_of[s.global_start], local, c))
            local += c
        return out

    def sample_valid(self, valid: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
        """Sorted global ids of `rng.choice(valid rows, size, replace=False)` as one process draws them."""
        n_valid = self.count(valid)
        picks = rng.choice(n_valid, size=min(size, n_valid), replace=False)
        local_valid = np.flatnonzero(valid)
        ids = np.full(len(picks), -1, dtype=np.int64)
        for global_pos, local_pos, length in self.positions(valid):
            inside = (picks >= global_pos) & (picks < global_pos + length)
            ids[inside] = self.part.global_ids(local_valid[local_pos + picks[inside] - global_pos])
        return np.sort(self.comm.max(ids, "share the sample's row ids"))

    def top_rows(self, c: np.ndarray, valid: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Global ids and c of the m largest c among all valid rows, ordered by (c descending, row id)."""
        local = seeds.top_rows(c, valid, m)
        pieces = self.comm.gather_objects((self.part.global_ids(local), c[local]), "gather the top rows")
        ids = np.concatenate([p[0] for p in pieces])
        cs = np.concatenate([p[1] for p in pieces])
        order = np.lexsort((ids, -cs))[:m]
        return ids[order], cs[order]

    def _fetch(self, global_ids: np.ndarray, take, what: str) -> list:
        mask, local = self.part.owned(global_ids)
        return self.comm.gather_objects((np.flatnonzero(mask), take(local[mask])), what)

    def fetch(self, matrix: str, global_ids: np.ndarray) -> np.ndarray:
        """float32 rows of one matrix at global ids, on every rank."""
        out = np.empty((len(global_ids), self.part.dim), dtype=np.float32)
        for idx, rows in self._fetch(global_ids, lambda local: self.part.gather(matrix, local), f"share {matrix} rows"):
            out[idx] = rows
        return out

    def values(self, array: np.ndarray, global_ids: np.ndarray) -> np.ndarray:
        """A per-row array's values at global ids, on every rank."""
        out = np.empty(len(global_ids), dtype=array.dtype)
        for idx, vals in self._fetch(global_ids, lambda local: array[local], "share per-row values"):
            out[idx] = vals
        return out

    def texts(self, global_ids: np.ndarray, kind: str) -> list:
        """Captions (kind "caption") or keys ("key") of rows, on every rank."""
        out = [None] * len(global_ids)
        take = self.part.captions if kind == "caption" else (lambda local: self.part.keys.take(local).to_pylist())
        for idx, vals in self._fetch(global_ids, take, f"share {kind}s"):
            for i, v in zip(idx, vals):
                out[i] = v
        return out

    def mark(self, array: np.ndarray, global_ids: np.ndarray, value) -> None:
        mask, local = self.part.owned(global_ids)
        array[local[mask]] = value


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
    timer = passes.Timer(cfg.device)
    part = RankRows(list(paths), comm.rank, comm.world)
    sh = Shared(comm, part)
    if cfg.spec.needs_mapper and cfg.seed_set_size > part.total_rows:
        raise InputError(f"seed_set_size (--seed-set-size) {cfg.seed_set_size} is larger than the data "
                         f"({part.total_rows} rows): lower it")
    truth = part.labels() if labels is None else _read_labels(labels, part.keys)
    timer.add("open", time.perf_counter() - t_start)
    mapper_fp = None
    if cfg.spec.needs_mapper:
        mapper, mapper_fp = _resolve_mapper(mapper, part)
        if hasattr(mapper, "to"):
            mapper = mapper.to(torch.device(cfg.device))
    show = progress and comm.is_root
    test_hook("consistency", comm)
    s = passes.consistency_pass(part, mapper, cfg, timer, show)
    n_bad = part.total_rows - sh.count(s.valid)
    s.warnings = [] if not n_bad else [
        f"{n_bad:,} row{'s' if n_bad != 1 else ''} with NaN/inf or zero-norm embeddings (listed in invalid.txt) "
        "took no part in any fit or verdict: re-embed them"]
    test_hook("gmm", comm)
    if cfg.spec.verdict == "clusters":
        _coarse_stage(s, cfg, sh, timer)
        reference = _reference_sample(s, mapper, cfg, sh)
        found = _cluster_stage(s, reference, cfg, sh, timer)
        test_hook("correlation", comm)
        z = passes.cluster_correlation_pass(s, found, cfg, part, timer, show)
        threshold = _clusters_verdict(s, found, z, cfg, sh, timer)
    elif cfg.spec.needs_mapper:
        split = _coarse_stage(s, cfg, sh, timer)
        corr_captions = _seed_stage(s, cfg, sh, timer)
        test_hook("correlation", comm)
        passes.correlation_pass(s, corr_captions, cfg, part, timer, show)
        threshold = _paper_verdict(s, split, cfg, sh, timer)
    else:
        threshold = _baseline_verdict(s, cfg, sh, timer)
    test_hook("publish", comm)
    elapsed = time.perf_counter() - t_start
    summary = _summary(s, cfg, sh, labels, truth, mapper_fp, threshold, timer, elapsed, threads)
    t0 = time.perf_counter()
    publish(comm, part, s, summary, out)
    summary["timings_s"]["publish"] = round(time.perf_counter() - t0, 4)
    return summary


def _read_labels(path, keys):
    from ..pipeline.source import read_labels

    return read_labels(path, keys)


def _resolve_mapper(mapper, part: RankRows):
    from .. import mapper as mapper_mod
    from ..provenance import file_digest, text_digest

    if isinstance(mapper, (str, Path)):
        m = mapper_mod.load_mapper(Path(mapper), expect_model=part.identity["model"], expect_dim=part.dim)
        return m, "file:" + file_digest(Path(mapper))
    return mapper, "object:" + text_digest(getattr(mapper, "config", {}))


# -- the coarse stage, the reference sample, the caption clusters -------------------------------------------
def _coarse_stage(s, cfg: ScanConfig, sh: Shared, timer) -> coarse.CoarseSplit:
    t0 = time.perf_counter()
    n_valid = sh.count(s.valid)
    if n_valid < cfg.components:
        raise InputError(f"{sh.part.path}: {n_valid} valid rows is fewer than --components {cfg.components}")
    values = s.c[s.valid]
    gmm = fit_gmm_sharded(sh.comm, values, sh.positions(s.valid), k=cfg.components, seed=cfg.random_seed)
    lowest = int(np.argmin(gmm.means))
    posterior = np.full(len(s.c), np.nan, dtype=np.float32)
    posterior[s.valid] = gmm.posterior(values, lowest)
    benign = np.zeros(len(s.c), dtype=bool)
    benign[s.valid] = posterior[s.valid] > cfg.gamma
    split = coarse.CoarseSplit(posterior=posterior, benign=benign, gmm=gmm, lowest=lowest)
    s.posterior = split.posterior
    s.subset[s.valid & split.benign] = BENIGN
    s.summary["gmm"] = split.gmm_summary()
    timer.add("gmm", time.perf_counter() - t0)
    return split


def _reference_sample(s, mapper, cfg: ScanConfig, sh: Shared) -> Reference:
    """pipeline.mapping.reference_sample, with the sample's rows fetched from their ranks."""
    import torch

    rng = np.random.default_rng(cfg.random_seed)
    rows = sh.sample_valid(s.valid, FIT_SAMPLE, rng)
    captions, images = sh.fetch("text", rows), sh.fetch("image", rows)
    with torch.no_grad():
        generated = mapper.map(torch.from_numpy(images).to(cfg.device), rows).float().cpu().numpy()
    t, i, g = (seeds.normalize_rows(x) for x in (captions, images, generated))
    by_mapper = float(np.median(np.sum(g * t, axis=1)))
    by_image = float(np.median(np.sum(i * t, axis=1)))
    by_mean = float(np.median(t @ seeds.normalize_rows(t.mean(axis=0, keepdims=True))[0]))
    s.summary["mapper_fit"] = {"median_cos_generated_caption": by_mapper, "median_cos_image_caption": by_image,
                               "median_cos_mean_caption": by_mean, "gain_over_mean_caption": by_mapper - by_mean,
                               "rows": len(rows)}
    if by_mapper - by_mean < 0.02:
        s.warnings.append(f"the mapping network explains almost nothing: its captions F(I) match the real captions "
                          f"(median cosine {by_mapper:.3f}) no better than the average caption does ({by_mean:.3f}); "
                          "c then measures noise: train a mapper on clean pairs of this embedding model")
    null = slice(0, min(NULL_SAMPLE, len(rows)))
    return Reference(captions=captions, images=images, generated=generated,
                     caption_coherence=seeds.mean_pairwise_cosine(captions[null]),
                     image_coherence=seeds.mean_pairwise_cosine(images[null]))


def _cluster_stage(s, ref: Reference, cfg: ScanConfig, sh: Shared, timer) -> list:
    """pipeline.clusters.cluster_stage on the seed pool shared by all ranks."""
    t0 = time.perf_counter()
    q = min(cfg.seed_set_size, sh.count(s.valid))
    ids, cs = sh.top_rows(s.c, s.valid, max(20 * q, 1000))
    order = np.argsort(ids)
    pool, pool_c = ids[order], cs[order]
    pool_captions = sh.fetch("text", pool)
    found = clusters_mod.caption_clusters(pool, pool_captions, ref.caption_coherence,
                                          min_members=min(cfg.min_cluster, q), min_relative=cfg.cluster_min_relative)
    found = clusters_mod.split_one_caption_groups(
        found, lambda rows: pool_captions[_positions(pool, rows)], SPLIT_SHARE, min(cfg.min_cluster, q))
    rng = np.random.default_rng(cfg.random_seed + 1)
    c_median, c_scale = _c_location(s, sh)
    for cluster in found:
        at = _positions(pool, cluster.rows)
        captions = pool_captions[at]
        images = sh.fetch("image", cluster.rows)
        caption_coh = seeds.mean_pairwise_cosine(captions)
        image_coh, image_z = clusters_mod.coherence_z(images, ref.images[:NULL_SAMPLE], rng)
        median_c = float(np.median(pool_c[at]))
        cluster.stats = {
            "size": int(len(cluster.rows)),
            "caption_coherence": caption_coh,
            "relative_caption_coherence": float(fine.relative_coherence(caption_coh, ref.caption_coherence)),
            "image_coherence": image_coh,
            "relative_image_coherence": float(fine.relative_coherence(image_coh, ref.image_coherence)),
            "image_coherence_z": image_z,
            "grounding": clusters_mod.grounding(captions.mean(axis=0), ref.generated),
            "median_c": median_c,
            "c_z": (median_c - c_median) / max(c_scale, 1e-9),
            "median_s_o": float(np.median(sh.values(s.s_o, cluster.rows))),
            "one_caption_share": clusters_mod.one_caption_share(captions),
        }
        cluster.seed_captions = captions[: cfg.seed_set_size]
    aside, rest = [], []
    for cl in found:
        if cl.stats["relative_image_coherence"] >= cfg.cluster_min_relative:
            aside.append((cl, "its images are near-identical too: a duplicate family, not a trigger"))
        elif cl.stats["one_caption_share"] >= ONE_CAPTION_SHARE and not cfg.test_one_caption_groups:
            aside.append((cl, f"{cl.stats['one_caption_share']:.0%} of it is one caption string over "
                              "unrelated images: boilerplate, or a backdoor with a single fixed caption "
                              "(test such groups with --test-one-caption-groups)"))
        else:
            rest.append(cl)
    rest.sort(key=lambda cl: (-cl.stats["median_c"], int(cl.rows[0])))
    aside += [(cl, f"not tested: more consistent than the {cfg.max_clusters} clusters tested (--max-clusters)")
              for cl in rest[cfg.max_clusters:]]
    first_captions = sh.texts(np.array([cl.rows[0] for cl, _ in aside], dtype=np.int64), "caption")
    s.summary["clusters_set_aside"] = [
        {"caption": caption, "seed_rows": cl.seed_rows(cfg.seed_set_size).tolist(), **cl.stats, "backdoor": False,
         "reason": reason} for (cl, reason), caption in zip(aside, first_captions)]
    tested = rest[:cfg.max_clusters]
    s.seed_rows = np.concatenate([c.seed_rows(cfg.seed_set_size) for c in tested]) if tested else \
        np.zeros(0, dtype=np.int64)
    sh.mark(s.subset, s.seed_rows, SEED)
    timer.add("seeds", time.perf_counter() - t0)
    return tested


def _c_location(s, sh: Shared) -> tuple[float, float]:
    """The median of c over valid rows and its MAD scale (1.4826 MAD), as np.median gives them."""
    if sh.c_location is None:
        c_valid = s.c[s.valid]
        median = select.median(sh.comm, c_valid)
        mad = select.median(sh.comm, np.abs(c_valid - median))
        sh.c_location = (float(median), float(mad) * 1.4826)
    return sh.c_location


# -- verdicts ---------------------------------------------------------------------------------------------------
def _significant(scores: np.ndarray, valid: np.ndarray, tested: np.ndarray, cfg: ScanConfig, method: str,
                 sh: Shared) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """pipeline.clusters._significant with the nulls and the cut computed over all ranks."""
    n, k = scores.shape
    rows = np.arange(n)
    if method in ("fdr", "fwer") and cfg.threshold is None:
        pvals, nulls = zip(*(dthr.null_pvalues(sh.comm, scores[:, j], valid) for j in range(k)))
        pvals = np.stack(pvals, axis=1)
        best = np.argmin(pvals, axis=1)
        p = np.minimum(1.0, k * pvals[rows, best])
        p[~valid] = np.nan
        control = dthr.benjamini_hochberg if method == "fdr" else dthr.family_wise
        level = cfg.fdr if method == "fdr" else cfg.alpha
        reject = np.zeros(n, dtype=bool)
        reject[tested], cut = control(sh.comm, p[tested], level)
        return reject, best, p, {"method": method, "level": level, "p_cut": cut, "nulls": list(nulls)}
    estimates = [cfg.threshold if cfg.threshold is not None else _estimate(scores[:, j], method, valid, cfg, sh)
                 for j in range(k)]
    margin = scores - np.asarray(estimates, dtype=np.float32)[None, :]
    best = np.argmax(np.where(np.isnan(margin), -np.inf, margin), axis=1)
    reject = tested & (margin[rows, best] > 0)
    return reject, best, np.full(n, np.nan), {"estimates": estimates}


def _estimate(score: np.ndarray, method: str, reference: np.ndarray, cfg: ScanConfig, sh: Shared) -> float:
    positions = sh.positions(np.isfinite(score)) if method == "mixture" else None
    return float(dthr.estimate(sh.comm, score, method, reference=reference, fpr=cfg.fpr, seed=cfg.random_seed,
                               positions=positions))


def _inconsistency_z(c_rows: np.ndarray, c_median: float, c_scale: float, sh: Shared) -> float:
    """pipeline.clusters.inconsistency_z over all ranks' rows."""
    n = select.count(sh.comm, c_rows)
    if n == 0:
        return float("nan")
    sigma = max(c_scale, 1e-9)
    return (float(select.median(sh.comm, c_rows)) - c_median) / (1.2533 * sigma / np.sqrt(n))


def _clusters_verdict(s, found: list, z: np.ndarray, cfg: ScanConfig, sh: Shared, timer) -> dict:
    """pipeline.clusters.clusters_verdict over all ranks."""
    t0 = time.perf_counter()
    n_clusters = len(found)
    s.score = np.full(sh.part.rows, np.nan, dtype=np.float32)
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
    discovery = "fwer" if cfg.threshold_method in ("fdr", "fwer") else cfg.threshold_method
    tested = valid & (s.subset != BENIGN)
    reject, best, p, cut = _significant(scores, valid, tested, cfg, discovery, sh)
    cut["null_clusters"] = list(range(n_clusters))
    c_median, c_scale = _c_location(s, sh)
    report = []
    backdoor = np.zeros(n_clusters, dtype=bool)
    first_captions = sh.texts(np.array([cl.rows[0] for cl in found], dtype=np.int64), "caption")
    for k, cluster in enumerate(found):
        mine = reject & (best == k)
        stats = {**cluster.stats, "significant_rows": sh.count(mine),
                 "inconsistency_z": _inconsistency_z(s.c[mine], c_median, c_scale, sh)}
        backdoor[k], reason, margins = is_backdoor(stats, cfg)
        stats["margins"] = margins
        if backdoor[k] and min(margins["significant_rows"] / max(cfg.min_cluster, 1),
                               margins["inconsistency_z"] / INCONSISTENCY_Z,
                               margins["relative_image_coherence"] / cfg.cluster_min_relative) < 0.2:
            s.warnings.append(f"cluster {k} is judged a backdoor by a narrow margin ({margins}): check its rows in "
                              "flagged.csv")
        report.append({"cluster": k, "caption": first_captions[k],
                       "seed_rows": cluster.seed_rows(cfg.seed_set_size).tolist(),
                       **stats, "backdoor": bool(backdoor[k]), "reason": reason})
    accepted = np.flatnonzero(backdoor)
    if len(accepted):
        s.seed_rows = np.concatenate([found[k].seed_rows(cfg.seed_set_size) for k in accepted])
        reject, best_accepted, p, cut = _significant(scores[:, accepted], valid, tested, cfg,
                                                     cfg.threshold_method, sh)
        cut["null_clusters"] = accepted.tolist()
        best = accepted[best_accepted]
        s.verdict[reject] = V_POISONED
    s.p_value = p
    s.cluster[valid] = best[valid].astype(np.int16)
    rows = np.arange(sh.part.rows)
    s.z = z[rows, best].astype(np.float32)
    s.score = scores[rows, best].astype(np.float32)
    s.summary["clusters"] = report
    s.summary["cluster"] = {"found": bool(len(accepted)), "clusters_examined": n_clusters,
                            "backdoor_clusters": accepted.tolist(),
                            "reason": "; ".join(f"cluster {r['cluster']}: {r['reason']}" for r in report)}
    timer.add("verdict", time.perf_counter() - t0)
    return {**info, **cut}


def _seed_stage(s, cfg: ScanConfig, sh: Shared, timer) -> np.ndarray:
    """pipeline.paper.seed_stage over all ranks."""
    t0 = time.perf_counter()
    n_valid = sh.count(s.valid)
    q = min(cfg.seed_set_size, n_valid)
    ids, cs = sh.top_rows(s.c, s.valid, q if cfg.seed_select == "top" else max(20 * q, 1000))
    order = np.argsort(ids)
    candidates, cand_c = ids[order], cs[order]
    if cfg.seed_select == "top":
        s.seed_rows = candidates[np.lexsort((candidates, -cand_c))][:q]
    else:
        s.seed_rows = seeds.dense_rows(candidates, sh.fetch("text", candidates), q)
    sh.mark(s.subset, s.seed_rows, SEED)
    rng = np.random.default_rng(cfg.random_seed)
    null_rows = sh.sample_valid(s.valid, NULL_SAMPLE, rng)
    null_coherence = seeds.mean_pairwise_cosine(sh.fetch("text", null_rows))
    seed_captions = sh.fetch("text", s.seed_rows)
    s.summary["cluster"] = {"found": True, "reason": "the paper's method has no cluster test",
                            "seed_rows": len(s.seed_rows), "null_coherence": null_coherence,
                            "cluster_coherence": seeds.mean_pairwise_cosine(seed_captions)}
    timer.add("seeds", time.perf_counter() - t0)
    return seed_captions


def _paper_verdict(s, split: coarse.CoarseSplit, cfg: ScanConfig, sh: Shared, timer) -> dict:
    """pipeline.paper.paper_verdict over all ranks."""
    t0 = time.perf_counter()
    null = None
    if cfg.spec.verdict == "coarse":
        s.score, thr, estimates = s.c.copy(), float("nan"), {}
        s.verdict[(s.subset == SEED) | (s.subset == SUSPICIOUS)] = V_POISONED
    else:
        s.score = fine.fine_score(s.z, s.s_o, cfg.score)
        s.score[~s.valid] = np.nan
        estimates = {m: _estimate(s.score, m, s.valid & split.benign, cfg, sh) for m in CLASSIC_ESTIMATORS}
        if cfg.threshold is not None:
            thr = cfg.threshold
        elif cfg.threshold_method in CLASSIC_ESTIMATORS:
            thr = estimates[cfg.threshold_method]
        else:
            s.p_value, null = dthr.null_pvalues(sh.comm, s.score, s.valid)
            control = dthr.benjamini_hochberg if cfg.threshold_method == "fdr" else dthr.family_wise
            reject, _ = control(sh.comm, s.p_value[s.valid], cfg.fdr if cfg.threshold_method == "fdr" else cfg.alpha)
            kept = s.score[s.valid][reject]
            low = float(sh.comm.min(np.array([kept.min() if len(kept) else np.inf]), "lowest rejected score")[0])
            if sh.count(reject):
                thr = low - 1e-7
            else:
                finite = s.score[np.isfinite(s.score)]
                thr = float(sh.comm.max(np.array([finite.max() if len(finite) else -np.inf]), "largest score")[0])
            estimates[cfg.threshold_method] = thr
        sh.mark(s.verdict, s.seed_rows, V_POISONED)
        s.verdict[(s.subset == SUSPICIOUS) & (s.score > thr)] = V_POISONED
    timer.add("verdict", time.perf_counter() - t0)
    return {"value": thr, "method": "given" if cfg.threshold is not None else cfg.threshold_method,
            "estimates": estimates, "score": cfg.score, **({"null": null} if null else {})}


def _baseline_verdict(s, cfg: ScanConfig, sh: Shared, timer) -> dict:
    """pipeline.paper.baseline_verdict over all ranks."""
    t0 = time.perf_counter()
    if cfg.method == "cosine":
        score = baselines.cosine_score(s.s_o)
        estimates = {"null-quantile": dthr.null_quantile(sh.comm, score, s.valid, cfg.fpr)}
        thr = cfg.threshold if cfg.threshold is not None else estimates["null-quantile"]
        method = "null-quantile"
    else:
        values = s.s_o[s.valid].astype(np.float64)
        gmm = fit_gmm_sharded(sh.comm, values, sh.positions(s.valid), k=2, seed=cfg.random_seed)
        upper = int(np.argmax(gmm.means))
        score = np.full(len(s.s_o), np.nan, dtype=np.float32)
        score[s.valid] = 1.0 - gmm.posterior(values, upper)
        s.summary["gmm"] = {"weights": [float(w) for w in gmm.weights], "means": [float(m) for m in gmm.means],
                            "variances": [float(v) for v in gmm.variances], "score": float(gmm.score),
                            "safe_component": upper}
        thr = cfg.threshold if cfg.threshold is not None else 1.0 - 0.9
        estimates, method = {}, "posterior"
    s.verdict[s.valid & (score > thr)] = V_POISONED
    s.score = score.astype(np.float32)
    s.score[~s.valid] = np.nan
    timer.add("verdict", time.perf_counter() - t0)
    return {"value": thr, "method": "given" if cfg.threshold is not None else method, "estimates": estimates,
            "score": cfg.method}


# -- the summary ------------------------------------------------------------------------------------------------
def _summary(s, cfg: ScanConfig, sh: Shared, labels, truth, mapper_fp, threshold: dict, timer, elapsed: float,
             threads: int) -> dict:
    from ..detect import metrics
    from ..provenance import device_name, versions

    comm, part = sh.comm, sh.part
    summary = dict(s.summary)
    subset_counts = comm.sum(np.bincount(s.subset, minlength=len(SUBSETS)).astype(np.int64), "count subsets")
    verdict_counts = comm.sum(np.bincount(s.verdict, minlength=len(VERDICTS)).astype(np.int64), "count verdicts")
    stage_times = comm.max(np.array(list(timer.stages.values()) + [elapsed]), "stage times")
    summary.update({
        "config": {**cfg.as_dict(), "labels": str(labels) if labels else None},
        "store": part.identity,
        "mapper": mapper_fp,
        "seeds": {"rows": s.seed_rows.tolist(), "keys": sh.texts(s.seed_rows, "key")},
        "counts": {
            "subset": {str(name): int(subset_counts[i]) for i, name in enumerate(SUBSETS)},
            "verdict": {str(name): int(verdict_counts[i]) for i, name in enumerate(VERDICTS)},
        },
        "threshold": threshold,
        "timings_s": {k: round(float(v), 4) for k, v in zip(list(timer.stages) + ["total"], stage_times)},
        "rows_per_s": part.total_rows / float(stage_times[-1]) if stage_times[-1] > 0 else None,
        "device": device_name(cfg.device),
        "threads": threads,
        "versions": versions(),
        "warnings": list(s.warnings),
        "distributed": {"world_size": comm.world, "backend": comm.backend,
                        "rows_per_rank": [int(r) for r in comm.gather_objects(part.rows, "rows per rank")],
                        "bytes_all_reduced_per_rank": int(comm.bytes_reduced())},
    })
    if truth is not None:
        valid = s.valid
        pieces = comm.gather_objects((part.global_ids(np.flatnonzero(valid)), truth[valid],
                                      s.verdict[valid] == V_POISONED, s.score[valid]), "gather the labelled rows")
        ids = np.concatenate([p[0] for p in pieces])
        order = np.argsort(ids, kind="stable")
        t, f, sc = (np.concatenate([p[i] for p in pieces])[order] for i in (1, 2, 3))
        summary["metrics"] = metrics.detection_metrics(t, f, sc)
        if len(s.seed_rows):
            summary["metrics"]["seed_precision"] = float(sh.values(truth, s.seed_rows).mean())
    return summary
