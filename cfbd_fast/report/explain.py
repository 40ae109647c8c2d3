"""Why a row got its verdict: its scores, the cut it was held against, and the seed captions nearest to its own."""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from .outputs import ScanOutputs

ROW_FIELDS = ("s_o", "s_g", "c", "posterior", "subset", "cluster", "z", "score", "p_value", "verdict")


def score_thresholds(summary: dict) -> dict:
    """The cut on the score for each cluster (key: cluster id), or for every row (key: None).

    An error-controlled cut (fdr, fwer) on p-values is turned into the score where a row's p-value, times the
    number of clusters tested together (Bonferroni), reaches the cut: location + scale * z(1 - p_cut / k).
    """
    thr = summary.get("threshold", {})
    clusters = _null_clusters(summary)
    if clusters is None:
        value = thr.get("value")
        return {None: float(value) if value is not None else math.nan}
    if "nulls" in thr:
        k = max(len(clusters), 1)
        p_cut = thr.get("p_cut", 0.0)
        level = 1.0 - p_cut / k
        z = NormalDist().inv_cdf(level) if 0.0 < level < 1.0 else math.inf
        return {c: null["location"] + null["scale"] * z for c, null in zip(clusters, thr["nulls"])}
    return {c: float(v) for c, v in zip(clusters, thr.get("estimates", []))}


def _null_clusters(summary: dict) -> list | None:
    """The cluster each of the threshold's nulls or estimates belongs to; None for a method without clusters."""
    thr = summary.get("threshold", {})
    if "null_clusters" in thr:
        return thr["null_clusters"]
    if "clusters" not in summary or not ("nulls" in thr or isinstance(thr.get("estimates"), list)):
        return None
    found = summary.get("cluster", {})  # scans before null_clusters was recorded: the verdict's last cut
    return found.get("backdoor_clusters") if found.get("found") else list(range(len(summary["clusters"])))


def nulls(summary: dict) -> dict:
    """The normal null of the score for each cluster (key: cluster id) or for every row (key: None)."""
    thr = summary.get("threshold", {})
    if "nulls" in thr:
        return dict(zip(_null_clusters(summary), thr["nulls"]))
    return {None: thr["null"]} if "null" in thr else {}


def seed_rows(summary: dict, cluster: int | None) -> tuple[list[int], str]:
    """The seed rows a row's correlation z was measured against, and what they are."""
    for entry in summary.get("clusters", []):
        if cluster is not None and entry["cluster"] == cluster:
            return entry["seed_rows"], f"cluster {cluster}'s seed captions"
    rows = summary.get("seeds", {}).get("rows", [])
    return rows, "the seed set's captions"


def nearest_seeds(out: ScanOutputs, rows: list[int], n: int = 5) -> list[list[dict]]:
    """For each row, the `n` seed captions nearest to its caption (cosine), from its own cluster's seeds."""
    if out.store is None:
        return [[] for _ in rows]
    by_cluster: dict = {}
    for i, row in enumerate(rows):
        cluster = int(out.columns["cluster"][row])
        by_cluster.setdefault(cluster if cluster >= 0 else None, []).append(i)
    result: list[list[dict]] = [[] for _ in rows]
    for cluster, positions in by_cluster.items():
        seeds, _ = seed_rows(out.summary, cluster)
        if not seeds:
            continue
        seeds = np.asarray(seeds, dtype=np.int64)
        cos = out.text_vectors([rows[i] for i in positions]) @ out.text_vectors(seeds).T
        for line, i in enumerate(positions):
            order = np.argsort(-cos[line], kind="stable")
            order = [j for j in order if seeds[j] != rows[i]][:n]
            result[i] = [{"row_id": int(seeds[j]), "key": out.columns["key"][seeds[j]],
                          "caption": out.caption(seeds[j]), "cosine": float(cos[line, j])} for j in order]
    return result


def explain_rows(out: ScanOutputs, rows: list[int], neighbours: int = 5) -> list[dict]:
    """Each row's values, the verdict's reasons, and its nearest seed captions (JSON-safe)."""
    thresholds = score_thresholds(out.summary)
    near = nearest_seeds(out, rows, neighbours)
    explained = []
    for row, seeds in zip(rows, near):
        values = {name: _value(out.columns[name][row]) for name in ROW_FIELDS}
        cluster = values["cluster"] if values["cluster"] >= 0 else None
        threshold = thresholds.get(cluster, thresholds.get(None, math.nan))
        image = out.image_file(row)
        entry = {"key": out.columns["key"][row], "row_id": int(out.columns["row_id"][row]),
                 "caption": out.caption(row), "image": str(image) if image else None,
                 "label": bool(out.labels[row]) if out.labels is not None else None,
                 **values, "threshold": _value(threshold), "reasons": reasons(out, row, values, threshold),
                 "nearest_seeds_of": seed_rows(out.summary, cluster)[1] if seeds else None,
                 "nearest_seeds": seeds}
        explained.append(entry)
    return explained


def reasons(out: ScanOutputs, row: int, v: dict, threshold: float) -> list[str]:
    """The verdict in steps a person can check, in the order the method took them."""
    cfg = out.summary["config"]
    method = cfg["method"]
    if v["verdict"] == "invalid":
        return ["its image or caption vector is not finite or is all zeros: it was not scored"]
    steps = []
    if method in ("cfbd", "cfbd-paper", "coarse"):
        posterior = v["posterior"]
        if v["subset"] == "benign":
            steps.append(f"coarse stage: benign (posterior of the lowest-c GMM component {posterior:.3f} > "
                         f"gamma {cfg['gamma']}); the fine stage does not test it")
        else:
            steps.append(f"coarse stage: {v['subset']} (posterior of the lowest-c GMM component {posterior:.3f} "
                         f"<= gamma {cfg['gamma']}; c = {v['c']:.4f})")
    if method == "coarse":
        steps.append("coarse flags every seed and suspicious row")
    elif method == "cfbd-paper" and v["subset"] == "seed":
        steps.append("a seed row: the paper's rule flags every seed")
    elif method in ("cosine", "safeclip") or v["subset"] != "benign":
        where = f" for cluster {v['cluster']}" if method == "cfbd" and v["cluster"] >= 0 else ""
        above = v["score"] > threshold if v["score"] is not None else False
        p = f", p-value {v['p_value']:.3g}" if v["p_value"] is not None else ""
        steps.append(f"score {_fmt(v['score'])}{p}: {'above' if above else 'not above'} the cut "
                     f"{_fmt(threshold)}{where}")
    if method == "cfbd":
        entry = next((c for c in out.summary.get("clusters", []) if c["cluster"] == v["cluster"]), None)
        if entry is not None:
            steps.append(f"its z and score refer to cluster {entry['cluster']} ({entry['caption']!r}), "
                         f"{'a backdoor' if entry['backdoor'] else 'not a backdoor'}: {entry['reason']}")
        elif v["verdict"] == "benign":
            steps.append("no backdoor cluster was found, so no row is flagged")
    steps.append(f"verdict: {v['verdict']}")
    return steps


def _value(x):
    """A JSON-safe scalar: NaN becomes None."""
    if isinstance(x, (np.integer, int)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None  # NaN, or the cut of a cluster that nothing passes
    return x


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.4g}"
