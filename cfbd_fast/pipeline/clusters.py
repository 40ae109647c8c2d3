"""The cfbd method's middle: every caption cluster of the seed pool, its statistics and verdict, and the rows
significant for a backdoor cluster under an error-controlled cut. Every global step goes through `GlobalSteps`
(one process or ranks: global_steps.py)."""
from __future__ import annotations

import time

import numpy as np

from ..detect import clusters as clusters_mod, fine, seeds
from .global_steps import GlobalSteps
from .mapping import NULL_SAMPLE, Reference
from .options import BENIGN, SEED, V_POISONED, ScanConfig
from .passes import Scores, Timer


def cluster_stage(s: Scores, ref: Reference, cfg: ScanConfig, steps: GlobalSteps, timer: Timer) -> list:
    """The seed pool's caption clusters, each with its statistics; marks their seeds.

    Global: the seed pool (the rows with the largest c over all rows), its captions, each cluster's images and
    s_o, the median and scale of c.
    """
    t0 = time.perf_counter()
    q = min(cfg.seed_set_size, steps.count(s.valid))
    ids, ids_c = steps.top_rows(s.c, s.valid, seeds.pool_size(q, "dense"))
    order = np.argsort(ids)
    pool, pool_c = ids[order], ids_c[order]
    pool_captions = steps.fetch("text", pool)
    found = clusters_mod.caption_clusters(pool, pool_captions, ref.caption_coherence,
                                          min_members=min(cfg.min_cluster, q), min_relative=cfg.cluster_min_relative)
    found = clusters_mod.split_one_caption_groups(
        found, lambda rows: pool_captions[_positions(pool, rows)], SPLIT_SHARE, min(cfg.min_cluster, q))
    rng = np.random.default_rng(cfg.random_seed + 1)
    c_median, c_scale = c_location(s, steps)
    for cluster in found:
        at = _positions(pool, cluster.rows)
        captions = pool_captions[at]
        images = steps.fetch("image", cluster.rows)
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
            "median_s_o": float(np.median(steps.values(s.s_o, cluster.rows))),
            "one_caption_share": clusters_mod.one_caption_share(captions),
        }
        cluster.seed_captions = captions[: cfg.seed_set_size]
    # Set aside before pass 2: duplicate families (near-identical images under one caption) and, unless asked
    # for, one-caption groups (one caption string over many unrelated images: boilerplate). Of the rest, the
    # clusters whose pairs are the least consistent are tested: a backdoor's captions do not fit its images.
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
    first_captions = steps.captions([cl.rows[0] for cl, _ in aside])
    s.summary["clusters_set_aside"] = [
        {"caption": caption, "seed_rows": cl.seed_rows(cfg.seed_set_size).tolist(), **cl.stats, "backdoor": False,
         "reason": reason} for (cl, reason), caption in zip(aside, first_captions)]
    tested = rest[:cfg.max_clusters]
    s.seed_rows = np.concatenate([c.seed_rows(cfg.seed_set_size) for c in tested]) if tested else \
        np.zeros(0, dtype=np.int64)
    steps.mark(s.subset, s.seed_rows, SEED)
    timer.add("seeds", time.perf_counter() - t0)
    return tested


def _positions(rows: np.ndarray, subset_rows: np.ndarray) -> np.ndarray:
    """Positions in `rows` of each of `subset_rows` (all present)."""
    order = np.argsort(rows, kind="stable")
    return order[np.searchsorted(rows, subset_rows, sorter=order)]


def c_location(s: Scores, steps: GlobalSteps) -> tuple[float, float]:
    """The median of c over every valid row and its scale (1.4826 MAD), as np.median gives them (global)."""
    c_valid = s.c[s.valid]
    median = steps.median(c_valid)
    return float(median), float(steps.median(np.abs(c_valid - median))) * 1.4826


ONE_CAPTION_SHARE = 0.5  # at least half of a cluster is one caption string: a one-caption group
SPLIT_SHARE = 0.25  # a caption string that makes up a quarter of a cluster is split off as its own group
INCONSISTENCY_Z = 3.09  # one-sided 0.001: the cluster's pairs fit their images worse than the bulk's do


def is_backdoor(stats: dict, cfg: ScanConfig) -> tuple[bool, str, dict]:
    """A cluster's verdict from its measured statistics, the reason, and its margin from each boundary.

    A backdoor cluster has enough rows significant for it and its pairs are inconsistent with their images under
    the mapper (their c lies above the bulk's; a genuine group sharing a caption that describes its images is
    consistent). Duplicate families and one-caption groups were set aside before (`cluster_stage`).
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


def inconsistency_z(c: np.ndarray, mine: np.ndarray, location: tuple[float, float], steps: GlobalSteps) -> float:
    """How far the median c of the rows under `mine` lies above the median of all (`location`: `c_location`),
    in standard errors of a median (global)."""
    n = steps.count(mine)
    if n == 0:
        return float("nan")
    median, scale = location
    sigma = max(scale, 1e-9)
    return (float(steps.median(c[mine])) - median) / (1.2533 * sigma / np.sqrt(n))


def _significant(scores: np.ndarray, valid: np.ndarray, tested: np.ndarray, cfg: ScanConfig, method: str,
                 steps: GlobalSteps) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Which rows are significant for which of the score columns: (reject, best column, p-value, cut info).

    With `fdr`/`fwer`, each column gets p-values under its own robust null; a row's p-value is its smallest,
    times the number of columns (Bonferroni over the clusters); one Benjamini-Hochberg (or Bonferroni) cut over
    the `tested` rows follows. With a classic estimator or a given threshold, a row is significant when its score
    is above its column's threshold. Global: the nulls, the cut, the estimates.
    """
    n, k = scores.shape
    rows = np.arange(n)
    if method in ("fdr", "fwer") and cfg.threshold is None:
        pvals, nulls = zip(*(steps.null_pvalues(scores[:, j], valid) for j in range(k)))
        pvals = np.stack(pvals, axis=1)
        best = np.argmin(pvals, axis=1)
        p = np.minimum(1.0, k * pvals[rows, best])
        p[~valid] = np.nan
        level = cfg.fdr if method == "fdr" else cfg.alpha
        reject = np.zeros(n, dtype=bool)
        reject[tested], cut = steps.control(method, p[tested], level)
        return reject, best, p, {"method": method, "level": level, "p_cut": cut, "nulls": list(nulls)}
    estimates = [cfg.threshold if cfg.threshold is not None else
                 steps.estimate(scores[:, j], method, reference=valid, fpr=cfg.fpr, seed=cfg.random_seed)
                 for j in range(k)]
    margin = scores - np.asarray(estimates, dtype=np.float32)[None, :]
    best = np.argmax(np.where(np.isnan(margin), -np.inf, margin), axis=1)
    reject = tested & (margin[rows, best] > 0)
    return reject, best, np.full(n, np.nan), {"estimates": estimates}


def clusters_verdict(s: Scores, found: list, z: np.ndarray, cfg: ScanConfig, steps: GlobalSteps,
                     timer: Timer) -> dict:
    """Each cluster's verdict from its statistics, then the rows: those significant for a backdoor cluster.

    Step 1 tests every row against every cluster (Bonferroni over the clusters) to count each cluster's
    significant rows and measure them. Step 2 tests the rows again against the backdoor clusters alone, so that
    the clusters set aside do not dilute the error control of the verdict. Returns the threshold summary.
    Global: the nulls and cuts (`_significant`), each cluster's count of significant rows and their median c.
    """
    t0 = time.perf_counter()
    n_clusters = len(found)
    s.score = np.full(len(s.c), np.nan, dtype=np.float32)
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
    # Clusters are found under family-wise error control (a backdoor is claimed only when rows are significant
    # after Bonferroni over every row and cluster); the rows of a backdoor cluster then under --fdr or --alpha.
    discovery = "fwer" if cfg.threshold_method in ("fdr", "fwer") else cfg.threshold_method
    # The fine stage tests the rows the coarse stage did not call benign (the paper's suspicious subset and
    # the seeds): a pair whose image and caption agree is not a poison, and fewer tests mean a looser cut.
    tested = valid & (s.subset != BENIGN)
    reject, best, p, cut = _significant(scores, valid, tested, cfg, discovery, steps)
    cut["null_clusters"] = list(range(n_clusters))  # the cluster each of cut's nulls (or estimates) belongs to
    report = []
    backdoor = np.zeros(n_clusters, dtype=bool)
    location = c_location(s, steps)
    first_captions = steps.captions([cl.rows[0] for cl in found])
    for k, cluster in enumerate(found):
        mine = reject & (best == k)
        stats = {**cluster.stats, "significant_rows": steps.count(mine),
                 "inconsistency_z": inconsistency_z(s.c, mine, location, steps)}
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
                                                    cfg.threshold_method, steps)
        cut["null_clusters"] = accepted.tolist()
        best = accepted[best_accepted]
        s.verdict[reject] = V_POISONED
    s.p_value = p
    s.cluster[valid] = best[valid].astype(np.int16)
    rows = np.arange(len(s.c))
    s.z = z[rows, best].astype(np.float32)
    s.score = scores[rows, best].astype(np.float32)
    s.summary["clusters"] = report
    s.summary["cluster"] = {"found": bool(len(accepted)), "clusters_examined": n_clusters,
                            "backdoor_clusters": accepted.tolist(),
                            "reason": "; ".join(f"cluster {r['cluster']}: {r['reason']}" for r in report)}
    timer.add("verdict", time.perf_counter() - t0)
    return {**info, **cut}
