"""The cfbd method's middle, over all rows: the seed pool's caption clusters and their statistics, the set-level
backdoor test and the rows flagged under an error-controlled cut. The rules are detect/cfbd.py's; this module
gathers what they need through `GlobalSteps` (one process or ranks: global_steps.py)."""
from __future__ import annotations

import time

import numpy as np

from ..detect import cfbd, fine, seeds
from ..distributed import select
from .global_steps import GlobalSteps
from .mapping import NULL_SAMPLE, Reference
from .options import SEED, V_POISONED, ScanConfig
from .passes import Scores, Timer

GATHER_ROWS = 65_536  # member rows read at a time to measure which are undescribed


def cluster_stage(s: Scores, ref: Reference, cfg: ScanConfig, steps: GlobalSteps, timer: Timer) -> list:
    """The seed pool's caption clusters, each with its statistics; the ones tested, their seeds marked.

    Global: the seed pool (the rows with the largest c over all rows), its captions, each cluster's images and
    s_o, the median and scale of c.
    """
    t0 = time.perf_counter()
    q = min(cfg.seed_set_size, steps.count(s.valid))
    ids, ids_c = steps.top_rows(s.c, s.valid, seeds.pool_size(q, "dense"))
    order = np.argsort(ids)
    pool, pool_c = ids[order], ids_c[order]
    pool_captions = steps.fetch("text", pool)
    min_members = min(cfg.min_cluster, q)
    found = cfbd.caption_clusters(pool, pool_captions, ref.caption_coherence, min_members=min_members)
    found = cfbd.split_one_caption_groups(found, pool, pool_captions, min_members)
    rng = np.random.default_rng(cfg.random_seed + 1)
    c_median, c_scale = c_location(s, steps)
    grounding_ref = cfbd.grounding_reference(ref.captions, ref.images, cfbd.link_cosine(ref.caption_coherence))
    for cluster in found:
        at = np.searchsorted(pool, cluster.rows)
        captions = pool_captions[at]
        image_coh, image_z = cfbd.coherence_z(steps.fetch("image", cluster.rows), ref.images[:NULL_SAMPLE], rng)
        caption_coh = seeds.mean_pairwise_cosine(captions)
        median_c = float(np.median(pool_c[at]))
        cluster.stats = {
            "size": int(len(cluster.rows)),
            "caption_coherence": caption_coh,
            "relative_caption_coherence": float(fine.relative_coherence(caption_coh, ref.caption_coherence)),
            "image_coherence": image_coh,
            "relative_image_coherence": float(fine.relative_coherence(image_coh, ref.image_coherence)),
            "image_coherence_z": image_z,
            **cfbd.grounding(captions[0], grounding_ref),
            "median_c": median_c,
            "c_z": (median_c - c_median) / max(c_scale, 1e-9),
            "median_s_o": float(np.median(steps.values(s.s_o, cluster.rows))),
            "one_caption_share": cfbd.one_caption_share(captions),
        }
        cluster.seed_captions = captions[cfbd.distinct_captions(captions)][: cfg.seed_set_size]
    # Set aside before the correlation pass: duplicate families and ungrounded one-caption groups. Of the rest,
    # the --max-clusters clusters whose pairs are the least consistent are tested (a bound on the pass's work).
    # One-caption groups are grounded family-wise: the scan's alpha over them.
    one_caption = sum(cl.stats["one_caption_share"] >= cfbd.ONE_CAPTION_SHARE for cl in found)
    aside, rest = [], []
    for cl in found:
        reason = cfbd.set_aside_reason(cl.stats, cfg.test_one_caption_groups, cfg.alpha / max(one_caption, 1))
        (aside.append((cl, reason)) if reason else rest.append(cl))
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


def c_location(s: Scores, steps: GlobalSteps) -> tuple[float, float]:
    """The median of c over every valid row and its scale (1.4826 MAD), as np.median gives them (global)."""
    c_valid = s.c[s.valid]
    median = steps.median(c_valid)
    return float(median), float(steps.median(np.abs(c_valid - median))) * 1.4826


def _significant(scores: np.ndarray, valid: np.ndarray, cfg: ScanConfig,
                 steps: GlobalSteps, method: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Which rows are significant for which of the score columns: (reject, best column, p-value, cut info).

    With `fdr`/`fwer`, each column gets p-values under its own robust null; a row's p-value is its smallest,
    times the number of columns (Bonferroni over the clusters); one Benjamini-Hochberg (or Bonferroni) cut over
    the valid rows follows. With a classic estimator or a given threshold, a row is significant when its score
    is above its column's threshold. Global: the nulls, the cut, the estimates.
    """
    n, k = scores.shape
    rows = np.arange(n)
    method = method or cfg.threshold_method
    if method in ("fdr", "fwer") and cfg.threshold is None:
        pvals, nulls = zip(*(steps.null_pvalues(scores[:, j], valid) for j in range(k)))
        pvals = np.stack(pvals, axis=1)
        best = np.argmin(pvals, axis=1)
        p = np.minimum(1.0, k * pvals[rows, best])
        p[~valid] = np.nan
        level = cfg.fdr if method == "fdr" else cfg.alpha
        reject = np.zeros(n, dtype=bool)
        reject[valid], cut = steps.control(method, p[valid], level)
        return reject, best, p, {"method": method, "level": level, "p_cut": cut, "nulls": list(nulls)}
    estimates = [cfg.threshold if cfg.threshold is not None else
                 steps.estimate(scores[:, j], method, reference=valid, fpr=cfg.fpr, seed=cfg.random_seed)
                 for j in range(k)]
    margin = scores - np.asarray(estimates, dtype=np.float32)[None, :]
    best = np.argmax(np.where(np.isnan(margin), -np.inf, margin), axis=1)
    reject = valid & (margin[rows, best] > 0)
    return reject, best, np.full(n, np.nan), {"estimates": estimates}


def _inconsistency(s: Scores, z: np.ndarray, link: float, ref: Reference,
                   steps: GlobalSteps) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Each cluster's members (valid rows whose caption reaches `link` against its seeds), how many of them are
    inconsistent with their images (`cfbd.inconsistent_rows`) and how many are undescribed (`cfbd.undescribed`,
    against the reference sample's images; the data's share measured on the reference sample's own pairs).
    Global: the quantiles, the counts."""
    tail = cfbd.INCONSISTENT_TAIL
    cuts = {"c_above": float(select.quantile(steps.comm, s.c[s.valid], 1.0 - tail)),
            "s_o_at_most": float(select.quantile(steps.comm, s.s_o[s.valid], tail))}
    inconsistent = cfbd.inconsistent_rows(s.c, s.s_o, s.valid, cuts["c_above"], cuts["s_o_at_most"])
    member = s.valid[:, None] & (z >= link)
    null_images = ref.images[:NULL_SAMPLE]
    undescribed = np.zeros(len(s.c), dtype=bool)
    rows = np.flatnonzero(member.any(axis=1))
    for part in np.array_split(rows, max(1, -(-len(rows) // GATHER_ROWS))):
        undescribed[part] = cfbd.undescribed(steps.source.gather("image", part), steps.source.gather("text", part),
                                             null_images)
    members = np.array([steps.count(member[:, k]) for k in range(z.shape[1])], dtype=np.int64)
    bad = np.array([steps.count(inconsistent & member[:, k]) for k in range(z.shape[1])], dtype=np.int64)
    undescribed_counts = np.array([steps.count(undescribed & member[:, k]) for k in range(z.shape[1])],
                                  dtype=np.int64)
    cuts["share_of_all_rows"] = steps.count(inconsistent) / max(steps.count(s.valid), 1)
    cuts["undescribed_share"] = float(np.mean(cfbd.undescribed(ref.images, ref.captions, null_images)))
    return members, bad, undescribed_counts, cuts


def clusters_verdict(s: Scores, found: list, z: np.ndarray, ref: Reference, cfg: ScanConfig, steps: GlobalSteps,
                     timer: Timer) -> dict:
    """Each tested cluster's verdict by the set-level test (detect/cfbd.py, family-wise at --alpha over the
    clusters), then the rows: those significant for a backdoor cluster under --fdr (or --alpha). Returns the
    threshold summary. Global: the counts of the test, the nulls and cuts (`_significant`).
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
    # The fine stage tests every valid row, where the paper tests its suspicious subset alone: a mapper that
    # explains little calls poisons benign (13-22 of 100 at 1% on Openclipart's weak tower at 10,000 pairs), and
    # the paper's rule lost them. The genuine pairs of the target's concept are kept afterwards by what their own
    # image shows (`described`).
    link = cfbd.link_cosine(ref.caption_coherence)
    members, bad, undescribed, inconsistent_when = _inconsistency(s, z, link, ref, steps)
    # every row against every cluster, family-wise (the p-values of the report, and the rule without a reference)
    reject_fw, best_fw, p_all, cut_all = _significant(scores, valid, cfg, steps,
                                                      "fwer" if cfg.threshold_method in ("fdr", "fwer") else None)
    significant = np.array([steps.count(reject_fw & (best_fw == k)) for k in range(n_clusters)], dtype=np.int64)
    tests = cfbd.inconsistency_test(members, bad, cfg.alpha, significant, min_rows=cfg.min_cluster,
                                    base_share=inconsistent_when["share_of_all_rows"], undescribed=undescribed,
                                    undescribed_base=inconsistent_when["undescribed_share"],
                                    grounding_p=np.array([cl.stats["grounding_p"] for cl in found]))
    backdoor = np.array([t["backdoor"] for t in tests], dtype=bool)
    first_captions = steps.captions([cl.rows[0] for cl in found])
    report = []
    for k, (cluster, test) in enumerate(zip(found, tests)):
        if test["backdoor"] and test["p_value"] > test["level"] / 10:
            s.warnings.append(f"cluster {k} ({first_captions[k]!r}) is judged a backdoor by a narrow margin (p "
                              f"{test['p_value']:.2g} at level {test['level']:.2g}): check its rows in flagged.csv")
        report.append({"cluster": k, "caption": first_captions[k],
                       "seed_rows": cluster.seed_rows(cfg.seed_set_size).tolist(), **cluster.stats, **test,
                       "reason": cfbd.verdict_reason(test)})
    accepted = np.flatnonzero(backdoor)
    best, p, cut = best_fw, p_all, {**cut_all, "null_clusters": list(range(n_clusters))}
    if len(accepted):  # the rows again, against the backdoor clusters alone, under --fdr (or --alpha)
        reject, best_accepted, p, cut = _significant(scores[:, accepted], valid, cfg, steps)
        cut["null_clusters"] = accepted.tolist()  # the cluster each of cut's nulls (or estimates) belongs to
        # a flagged pair whose caption describes its own image is a genuine pair of the target's concept, not a
        # poison (which passes this 1 time in 100: cfbd.described)
        flagged, described = np.flatnonzero(reject), np.zeros_like(reject)
        described[flagged] = cfbd.described(steps.source.gather("image", flagged),
                                            steps.source.gather("text", flagged), ref.images[:NULL_SAMPLE])
        reject &= ~described
        cut["described_kept"] = steps.count(described)
        best = accepted[best_accepted]
        s.seed_rows = np.concatenate([found[k].seed_rows(cfg.seed_set_size) for k in accepted])
        s.verdict[reject] = V_POISONED
    s.p_value = p
    s.cluster[valid] = best[valid].astype(np.int16)
    rows = np.arange(len(s.c))
    s.z = z[rows, best].astype(np.float32)
    s.score = scores[rows, best].astype(np.float32)
    s.summary["clusters"] = report
    s.summary["cluster"] = {"found": bool(len(accepted)), "clusters_examined": n_clusters,
                            "backdoor_clusters": accepted.tolist(), "member_link": link,
                            "inconsistent_when": inconsistent_when,
                            "reason": "; ".join(f"cluster {r['cluster']}: {r['reason']}" for r in report)}
    timer.add("verdict", time.perf_counter() - t0)
    return {**info, **cut}
