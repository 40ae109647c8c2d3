"""detect.threshold over scores spread across ranks, giving the numbers a single process gets: the null's
median, quantile and MAD by exact selection, Benjamini-Hochberg by its step-up fixed point over all-reduced
counts, and the classic estimators (gap from the merged top scores, mixture by the sharded GMM)."""
from __future__ import annotations

from statistics import NormalDist

import numpy as np

from ..detect import threshold as single
from . import select
from .comm import Comm
from .gmm import fit_gmm_sharded


def null_pvalues(comm: Comm, score: np.ndarray, reference: np.ndarray, upper_quantile: float = 0.95
                 ) -> tuple[np.ndarray, dict]:
    """single.null_pvalues over all ranks' rows: the same location and scale everywhere, local p-values."""
    from scipy.special import ndtr

    ref = score[reference & np.isfinite(score)].astype(np.float64)
    loc = float(select.median(comm, ref))
    z_q = NormalDist().inv_cdf(upper_quantile)
    scale = max(float(select.quantile(comm, ref, upper_quantile)) - loc, 1e-12) / z_q
    mad = float(select.median(comm, np.abs(ref - loc))) * 1.4826
    scale = max(scale, mad)
    p = np.ones(len(score), dtype=np.float64)
    ok = np.isfinite(score)
    p[ok] = ndtr(-(score[ok].astype(np.float64) - loc) / scale)
    return p, {"location": loc, "scale": scale, "upper_quantile": upper_quantile,
               "reference_rows": select.count(comm, ref)}


def benjamini_hochberg(comm: Comm, p: np.ndarray, fdr: float) -> tuple[np.ndarray, float]:
    """single.benjamini_hochberg over all ranks' p-values: the local rejections and the global p-value cut.

    The cut is the largest p-value p_(k) with p_(k) <= fdr k / n. Iterating t <- fdr #{p <= t} / n from t = fdr
    never passes below it and stops at a t with #{p <= t} = R; the cut is then the largest p-value <= t.
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


def family_wise(comm: Comm, p: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    cut = alpha / max(select.count(comm, p), 1)
    return p <= cut, cut


def null_quantile(comm: Comm, score: np.ndarray, reference: np.ndarray, fpr: float) -> float:
    return select.quantile(comm, score[reference & np.isfinite(score)], 1.0 - fpr, "higher")


def robust_z(comm: Comm, score: np.ndarray, fpr: float) -> float:
    s = score[np.isfinite(score)]
    if select.count(comm, s) == 0:
        return float("nan")
    med = float(select.median(comm, s))
    mad = float(select.median(comm, np.abs(s - med))) * 1.4826
    return med + NormalDist().inv_cdf(1.0 - fpr) * mad


def largest_gap(comm: Comm, score: np.ndarray, max_fraction: float = 0.05, min_above: int = 5) -> float:
    """single.largest_gap: the m largest scores of all ranks, merged on every rank (m = 5% of the rows)."""
    s = score[np.isfinite(score)]
    n = select.count(comm, s)
    if n <= min_above:
        return float("nan")
    m = min(n, max(min_above + 1, int(np.ceil(max_fraction * n)) + 1))
    mine = s if len(s) <= m else np.partition(s, len(s) - m)[len(s) - m:]
    merged = np.concatenate(comm.gather_objects(mine, "gather the top scores"))
    top = np.sort(np.partition(merged, len(merged) - m)[len(merged) - m:])[::-1]
    gaps = top[:-1] - top[1:]
    gaps[: min_above - 1] = -np.inf
    i = int(np.argmax(gaps))
    return float((top[i] + top[i + 1]) / 2.0)


def mixture(comm: Comm, score: np.ndarray, positions, seed: int = 0) -> float:
    """single.mixture; `positions` place this rank's finite scores in the global order (see fit_gmm_sharded)."""
    s = score[np.isfinite(score)]
    lo = float(comm.min(np.array([s.min() if len(s) else np.inf]))[0])
    hi = float(comm.max(np.array([s.max() if len(s) else -np.inf]))[0])
    if select.count(comm, s) < 2 or hi - lo == 0:
        return float("nan")
    gmm = fit_gmm_sharded(comm, s, positions, k=2, seed=seed)
    return single.mixture_cut(gmm, hi)


def estimate(comm: Comm, score: np.ndarray, method: str, *, reference: np.ndarray, fpr: float, seed: int,
             positions) -> float:
    if method == "null-quantile":
        return null_quantile(comm, score, reference, fpr)
    if method == "robust-z":
        return robust_z(comm, score, fpr)
    if method == "gap":
        return largest_gap(comm, score)
    return mixture(comm, score, positions, seed)
