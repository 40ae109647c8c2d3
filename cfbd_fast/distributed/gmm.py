"""fit_gmm over values spread across ranks: the same initialisation sample on every rank (the systematic sample
of the global value order, assembled by one all-reduce), then EM whose sufficient statistics are all-reduced
each iteration: 3k + 1 float64 numbers per rank and iteration."""
from __future__ import annotations

import numpy as np

from ..gmm import _kernels
from ..gmm import em as _em
from .comm import Comm


def fit_gmm_sharded(comm: Comm, values, positions: list[tuple[int, int, int]], k: int = 5, *, seed: int = 0,
                    max_iter: int = 200, tol: float = 1e-3, reg_covar: float = 1e-6) -> _em.GaussianMixture1D:
    """`fit_gmm(all values, k, seed=seed)` where this rank holds `values`; `positions` lists its pieces as
    (global position of the first value, local index of the first value, length), the global positions
    numbering all ranks' values in the order a single process would see them."""
    values, table = _em._as_kernel_input(values, check_finite=True)
    n = int(comm.sum(np.array([values.shape[0]], dtype=np.int64), "count GMM values")[0])
    _em._check_options(n, k, max_iter, tol, "kmeans", reg_covar)
    rng = np.random.default_rng(seed)
    indices = _em._init_indices(n, rng)
    sample = np.zeros(len(indices), dtype=np.float64)
    for global_start, local_start, length in positions:
        lo, hi = np.searchsorted(indices, [global_start, global_start + length])
        if hi > lo:
            sample[lo:hi] = _kernels.gather(values, table, indices[lo:hi] - global_start + local_start)
    sample = comm.sum(sample, "GMM initialisation sample")  # each position is held by one rank: exact

    weights, means, variances = _em._init_from_sample(sample, rng, k, reg_covar, max_iter, tol)

    def em_pass(v, t, log_coef, inv_two_var, mu):
        resp_sum, s1, s2, ll = _kernels.em_pass(v, t, log_coef, inv_two_var, mu)
        total = comm.sum(np.concatenate([resp_sum, s1, s2, [ll]]), "EM sufficient statistics")
        return total[:k], total[k:2 * k], total[2 * k:3 * k], float(total[3 * k])

    weights, means, variances, n_iter, converged = _em._run_em(values, table, weights, means, variances, reg_covar,
                                                               max_iter, tol, em_pass, n=n)
    score = em_pass(values, table, *_em._log_terms(weights, means, variances))[3] / n
    order = np.argsort(means, kind="stable")
    return _em.GaussianMixture1D(weights=weights[order], means=means[order], variances=variances[order],
                                 score=float(score), n_iter=n_iter, converged=converged)
