"""Thresholds that turn a fine-stage score into a verdict (score > threshold means poisoned).

Four estimators, compared on demo data with and without hard negatives (docs/algorithm.md):
- `null-quantile`: the (1 - fpr) quantile of the score over a reference subset assumed clean
  (the coarse stage's benign subset); controls the false-positive rate directly.
- `robust-z`: median + z * 1.4826 * MAD over all rows, z the standard-normal (1 - fpr) quantile.
- `gap`: the middle of the widest gap between consecutive sorted scores in the top `max_fraction`
  with at least `min_above` scores above it: a backdoor's captions share one target, so its pairs form a
  tight mode separated from the bulk.
- `mixture`: a 2-component GMM on the score; the lowest score whose upper-component posterior >= 0.5.

Every function takes the rows of one process, or, with `comm` (a distributed.comm.Comm), this rank's share of
rows spread over ranks, and returns the number one process over all rows gets: order statistics by exact
selection (distributed/select.py; numpy's own under a world of one), counts all-reduced.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from ..distributed import select
from ..distributed.comm import Comm

SOLO = Comm()  # one process alone: every collective is the identity


def null_quantile(score: np.ndarray, reference: np.ndarray, fpr: float, comm: Comm = SOLO) -> float:
    return select.quantile(comm, score[reference & np.isfinite(score)], 1.0 - fpr, "higher")


def robust_z(score: np.ndarray, fpr: float, comm: Comm = SOLO) -> float:
    s = score[np.isfinite(score)]
    if select.count(comm, s) == 0:
        return float("nan")
    med = float(select.median(comm, s))
    mad = float(select.median(comm, np.abs(s - med))) * 1.4826
    return med + NormalDist().inv_cdf(1.0 - fpr) * mad


def largest_gap(score: np.ndarray, max_fraction: float = 0.05, min_above: int = 5, comm: Comm = SOLO) -> float:
    """The m largest scores of all ranks (m = `max_fraction` of the rows), merged on every rank."""
    s = score[np.isfinite(score)]
    n = select.count(comm, s)
    if n <= min_above:
        return float("nan")
    m = min(n, max(min_above + 1, int(np.ceil(max_fraction * n)) + 1))
    mine = s if len(s) <= m else np.partition(s, len(s) - m)[len(s) - m:]
    merged = np.concatenate(comm.gather_objects(mine, "gather the top scores"))
    top = np.sort(np.partition(merged, len(merged) - m)[len(merged) - m:])[::-1]  # the m largest, descending
    gaps = top[:-1] - top[1:]  # gaps[i] lies below the i + 1 highest scores
    gaps[: min_above - 1] = -np.inf
    i = int(np.argmax(gaps))
    return float((top[i] + top[i + 1]) / 2.0)


def mixture(score: np.ndarray, seed: int = 0, comm: Comm = SOLO, positions=None) -> float:
    """`positions` place this rank's finite scores in the global order (gmm.fit_gmm_ranks); one process: None."""
    from ..gmm.em import fit_gmm, fit_gmm_ranks

    s = score[np.isfinite(score)]
    lo = float(comm.min(np.array([s.min() if len(s) else np.inf]), "smallest score")[0])
    hi = float(comm.max(np.array([s.max() if len(s) else -np.inf]), "largest score")[0])
    if select.count(comm, s) < 2 or hi - lo == 0:
        return float("nan")
    gmm = fit_gmm(s, k=2, seed=seed) if comm.world == 1 else fit_gmm_ranks(comm, s, positions, k=2, seed=seed)
    return mixture_cut(gmm, hi)


def mixture_cut(gmm, score_max: float) -> float:
    """Where a fitted 2-component mixture's upper component starts to win (`score_max` if it never does)."""
    lo, up = int(np.argmin(gmm.means)), int(np.argmax(gmm.means))
    w, m, v = gmm.weights, gmm.means, gmm.variances
    # log(w_up N(x; up)) - log(w_lo N(x; lo)) = a x^2 + b x + c: the posterior of `up` is 0.5 at its roots
    a = 1 / (2 * v[lo]) - 1 / (2 * v[up])
    b = m[up] / v[up] - m[lo] / v[lo]
    c = m[lo] ** 2 / (2 * v[lo]) - m[up] ** 2 / (2 * v[up]) + np.log(w[up] / w[lo]) - 0.5 * np.log(v[up] / v[lo])
    if abs(a) < 1e-12:
        roots = [-c / b]
    else:
        disc = b * b - 4 * a * c
        roots = [] if disc < 0 else [(-b - np.sqrt(disc)) / (2 * a), (-b + np.sqrt(disc)) / (2 * a)]
    rising = [r for r in roots if r >= m[lo] and 2 * a * r + b > 0]  # where `up` starts to win
    return float(min(rising)) if rising else score_max


def estimate(score: np.ndarray, method: str, *, reference: np.ndarray | None = None, fpr: float = 0.001,
             seed: int = 0, comm: Comm = SOLO, positions=None) -> float:
    """One threshold by `method` (see the module docstring); `reference` defaults to every row."""
    if reference is None:
        reference = np.ones(len(score), dtype=bool)
    if method == "null-quantile":
        return float(null_quantile(score, reference, fpr, comm))
    if method == "robust-z":
        return float(robust_z(score, fpr, comm))
    if method == "gap":
        return float(largest_gap(score, comm=comm))
    return float(mixture(score, seed, comm, positions))


# -- a verdict with a stated error rate ------------------------------------------------------------------------
def null_pvalues(score: np.ndarray, reference: np.ndarray, upper_quantile: float = 0.95, comm: Comm = SOLO
                 ) -> tuple[np.ndarray, dict]:
    """One-sided p-values of `score` under a normal null fitted to the bulk of `reference` rows.

    Location: the median. Scale: from the distance between the median and the `upper_quantile` (the side the
    poisons are on, and the side whose tail decides false positives), so a bulk whose upper tail is heavier
    than a normal one gets a wider null. A poisoned fraction below 1 - upper_quantile does not move either.
    NaN scores get p = 1. Over ranks: the same location and scale on every rank, local p-values.
    """
    import torch

    ref = score[reference & np.isfinite(score)].astype(np.float64)
    loc = float(select.median(comm, ref))
    z_q = NormalDist().inv_cdf(upper_quantile)
    scale = max(float(select.quantile(comm, ref, upper_quantile)) - loc, 1e-12) / z_q
    mad = float(select.median(comm, np.abs(ref - loc))) * 1.4826
    scale = max(scale, mad)
    p = np.ones(len(score), dtype=np.float64)
    ok = np.isfinite(score)
    # the normal upper tail as erfc (torch: no scipy at run time), accurate far into the tail
    z = torch.from_numpy((score[ok].astype(np.float64) - loc) / scale)
    p[ok] = (0.5 * torch.special.erfc(z / math.sqrt(2.0))).numpy()
    return p, {"location": loc, "scale": scale, "upper_quantile": upper_quantile,
               "reference_rows": select.count(comm, ref)}


def benjamini_hochberg(p: np.ndarray, fdr: float, comm: Comm = SOLO) -> tuple[np.ndarray, float]:
    """Rows rejected by Benjamini-Hochberg at false-discovery rate `fdr`, and the p-value cut it implies.

    The cut is the largest p-value p_(k) with p_(k) <= fdr k / n. Iterating t <- fdr #{p <= t} / n from t = fdr
    never passes below it and stops at a t with #{p <= t} = R; the cut is then the largest p-value <= t. Over
    ranks the counts are all-reduced: local rejections, the global cut.
    """
    n = select.count(comm, p)
    local = np.sort(p[p <= fdr])
    t, previous = fdr, -1
    while True:
        r = int(comm.sum(np.array([np.searchsorted(local, t, side="right")], dtype=np.int64), "BH count")[0])
        if r == 0:
            return np.zeros(len(p), dtype=bool), 0.0
        if r == previous:
            break
        previous, t = r, fdr * np.float64(r) / n
    below = local[local <= t]
    cut = float(comm.max(np.array([below[-1] if len(below) else -np.inf]), "BH cut")[0])
    return p <= cut, cut


def family_wise(p: np.ndarray, alpha: float, comm: Comm = SOLO) -> tuple[np.ndarray, float]:
    """Rows rejected by Bonferroni at family-wise error rate `alpha`, and the p-value cut."""
    cut = alpha / max(select.count(comm, p), 1)
    return p <= cut, cut
