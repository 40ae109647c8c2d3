"""Thresholds that turn a fine-stage score into a verdict (score > threshold means poisoned).

Four estimators, compared on demo data with and without hard negatives (docs/algorithm.md):
- `null-quantile`: the (1 - fpr) quantile of the score over a reference subset assumed clean
  (the coarse stage's benign subset); controls the false-positive rate directly.
- `robust-z`: median + z * 1.4826 * MAD over all rows, z the standard-normal (1 - fpr) quantile.
- `gap`: the middle of the widest gap between consecutive sorted scores in the top `max_fraction`
  with at least `min_above` scores above it: a backdoor's captions share one target, so its pairs form a
  tight mode separated from the bulk.
- `mixture`: a 2-component GMM on the score; the lowest score whose upper-component posterior >= 0.5.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

def null_quantile(score: np.ndarray, reference: np.ndarray, fpr: float) -> float:
    ref = score[reference & np.isfinite(score)]
    if len(ref) == 0:
        return float("nan")
    return float(np.quantile(ref, 1.0 - fpr, method="higher"))


def robust_z(score: np.ndarray, fpr: float) -> float:
    s = score[np.isfinite(score)]
    if len(s) == 0:
        return float("nan")
    med = float(np.median(s))
    mad = float(np.median(np.abs(s - med))) * 1.4826
    return med + NormalDist().inv_cdf(1.0 - fpr) * mad


def largest_gap(score: np.ndarray, max_fraction: float = 0.05, min_above: int = 5) -> float:
    s = score[np.isfinite(score)]
    if len(s) <= min_above:
        return float("nan")
    m = min(len(s), max(min_above + 1, int(np.ceil(max_fraction * len(s))) + 1))
    top = np.sort(np.partition(s, len(s) - m)[len(s) - m:])[::-1]  # the m largest, descending
    gaps = top[:-1] - top[1:]  # gaps[i] lies below the i + 1 highest scores
    gaps[: min_above - 1] = -np.inf
    i = int(np.argmax(gaps))
    return float((top[i] + top[i + 1]) / 2.0)


def mixture(score: np.ndarray, seed: int = 0) -> float:
    from ..gmm import fit_gmm

    s = score[np.isfinite(score)]
    if len(s) < 2 or np.ptp(s) == 0:
        return float("nan")
    return mixture_cut(fit_gmm(s, k=2, seed=seed), float(s.max()))


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


_ESTIMATE = {
    "null-quantile": lambda score, reference, fpr, seed: null_quantile(score, reference, fpr),
    "robust-z": lambda score, reference, fpr, seed: robust_z(score, fpr),
    "gap": lambda score, reference, fpr, seed: largest_gap(score),
    "mixture": lambda score, reference, fpr, seed: mixture(score, seed=seed),
}


def estimate(score: np.ndarray, method: str, *, reference: np.ndarray | None = None, fpr: float = 0.001,
             seed: int = 0) -> float:
    """One threshold by `method` (see the module docstring); `reference` defaults to every row."""
    if reference is None:
        reference = np.ones(len(score), dtype=bool)
    return float(_ESTIMATE[method](score, reference, fpr, seed))


def all_estimates(score: np.ndarray, methods, *, reference: np.ndarray | None, fpr: float, seed: int = 0) -> dict:
    """Each named estimator's threshold, for the summary (so users can see how much the choice matters)."""
    return {m: estimate(score, m, reference=reference, fpr=fpr, seed=seed) for m in methods}


# -- a verdict with a stated error rate ------------------------------------------------------------------------
def null_pvalues(score: np.ndarray, reference: np.ndarray, upper_quantile: float = 0.95) -> tuple[np.ndarray, dict]:
    """One-sided p-values of `score` under a normal null fitted to the bulk of `reference` rows.

    Location: the median. Scale: from the distance between the median and the `upper_quantile` (the side the
    poisons are on, and the side whose tail decides false positives), so a bulk whose upper tail is heavier
    than a normal one gets a wider null. A poisoned fraction below 1 - upper_quantile does not move either.
    NaN scores get p = 1.
    """
    import torch

    ref = score[reference & np.isfinite(score)].astype(np.float64)
    loc = float(np.median(ref))
    z_q = NormalDist().inv_cdf(upper_quantile)
    scale = max(float(np.quantile(ref, upper_quantile)) - loc, 1e-12) / z_q
    mad = float(np.median(np.abs(ref - loc))) * 1.4826
    scale = max(scale, mad)
    p = np.ones(len(score), dtype=np.float64)
    ok = np.isfinite(score)
    # the normal upper tail as erfc (torch: no scipy at run time), accurate far into the tail
    z = torch.from_numpy((score[ok].astype(np.float64) - loc) / scale)
    p[ok] = (0.5 * torch.special.erfc(z / math.sqrt(2.0))).numpy()
    return p, {"location": loc, "scale": scale, "upper_quantile": upper_quantile, "reference_rows": int(len(ref))}


def benjamini_hochberg(p: np.ndarray, fdr: float) -> tuple[np.ndarray, float]:
    """Rows rejected by Benjamini-Hochberg at false-discovery rate `fdr`, and the p-value cut it implies."""
    n = len(p)
    order = np.argsort(p, kind="stable")
    passed = np.flatnonzero(p[order] <= fdr * np.arange(1, n + 1) / n)
    reject = np.zeros(n, dtype=bool)
    if len(passed) == 0:
        return reject, 0.0
    k = passed[-1]
    reject[order[:k + 1]] = True
    return reject, float(p[order[k]])


def family_wise(p: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Rows rejected by Bonferroni at family-wise error rate `alpha`, and the p-value cut."""
    cut = alpha / max(len(p), 1)
    return p <= cut, cut
