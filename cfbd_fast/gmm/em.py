"""fit_gmm: a 1-D Gaussian mixture fitted by EM over millions of scores (input checks, initialisation, EM loop).

The EM arithmetic is scikit-learn's GaussianMixture(covariance_type="full") restricted to one dimension.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from . import _kernels

INIT_SAMPLE = 100_000  # k-means and a first EM run use at most this many samples (initialisation only)
KMEANS_RESTARTS = 4  # k-means++ seedings tried on the sample; the lowest inertia wins
KMEANS_SEEDING_SAMPLE = 20_000  # k-means++ draws its seeds from an evenly thinned copy of the sorted sample
KMEANS_MAX_ITER = 300
SAMPLE_TOL_FACTOR = 0.3  # EM on the sample stops at tol * this, so the full-data EM starts near convergence

_EPS10 = 10 * np.finfo(np.float64).eps  # scikit-learn adds this to every component's responsibility sum
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_HALF_TABLE = _kernels.half_to_float64_table()
_NO_TABLE = np.empty(0)


@dataclass(frozen=True)
class GaussianMixture1D:
    """A fitted 1-D mixture; components are sorted by mean, ascending (component 0 has the lowest mean).

    `score` is the mean log-likelihood per sample of these final parameters on the fitted data
    (scikit-learn's `score(X)`), `n_iter` the EM iterations run on all of x (after initialisation), `converged`
    whether the change of the mean log-likelihood fell below `tol` within `max_iter` of them.
    """

    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray
    score: float
    n_iter: int
    converged: bool

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    def log_terms(self):
        """Per component: log w - log sqrt(2 pi var), 1 / (2 var), mean (see the module function)."""
        return log_terms(self.weights, self.means, self.variances)

    def predict_proba(self, x) -> np.ndarray:
        """(n, k) float64 responsibilities p(component | x_i); each row sums to 1."""
        values, table = as_kernel_input(x, check_finite=False)
        out = np.empty((values.shape[0], self.n_components))
        _kernels.evaluate(values, table, *self.log_terms(), _kernels.PROBA, 0, out)
        return out

    def posterior(self, x, component: int) -> np.ndarray:
        """(n,) float64 p(component | x_i) of one component, without forming the (n, k) matrix."""
        if not 0 <= component < self.n_components:
            raise InputError(f"component {component} is out of range: the mixture has {self.n_components} components")
        values, table = as_kernel_input(x, check_finite=False)
        out = np.empty((values.shape[0], 1))
        _kernels.evaluate(values, table, *self.log_terms(), _kernels.POSTERIOR, int(component), out)
        return out[:, 0]

    def score_samples(self, x) -> np.ndarray:
        """(n,) float64 log-likelihood log p(x_i) of each sample."""
        values, table = as_kernel_input(x, check_finite=False)
        out = np.empty((values.shape[0], 1))
        _kernels.evaluate(values, table, *self.log_terms(), _kernels.LOG_LIKELIHOOD, 0, out)
        return out[:, 0]

    def mean_log_likelihood(self, x) -> float:
        """Mean log-likelihood per sample of `x` (scikit-learn's `score(X)`)."""
        values, table = as_kernel_input(x, check_finite=False)
        if values.shape[0] == 0:
            raise InputError("x is empty: pass at least one value")
        return _kernels.em_pass(values, table, *self.log_terms())[3] / values.shape[0]


def fit_gmm(x, k: int = 5, *, max_iter: int = 200, tol: float = 1e-3, init: str = "kmeans", seed: int = 0,
            reg_covar: float = 1e-6, weights_init=None, means_init=None, variances_init=None) -> GaussianMixture1D:
    """Fit a k-component 1-D Gaussian mixture to `x` by EM.

    x: 1-D (or (n, 1)) float64, float32 or float16 values; read-only and memory-mapped arrays are read in
    place (other real dtypes are converted). NaN or inf values are refused.
    init: "kmeans" = k-means++ and Lloyd (best of KMEANS_RESTARTS seedings, deterministic for `seed`) on a
    systematic sample of at most INIT_SAMPLE values, then EM on that sample to tol * SAMPLE_TOL_FACTOR.
    Ignored when weights_init, means_init and variances_init are given (all three together): EM starts there.
    tol: EM stops when the mean log-likelihood changes by less than tol between iterations (scikit-learn's rule).
    reg_covar: added to every variance in the M-step, so it is also the variance floor (must be > 0).
    Each iteration is one parallel pass over x; serial and parallel runs give bitwise equal results.
    """
    values, table = as_kernel_input(x, check_finite=True)
    check_options(values.shape[0], k, max_iter, tol, init, reg_covar)
    given = [p is not None for p in (weights_init, means_init, variances_init)]
    initial = None
    if any(given):
        if not all(given):
            raise InputError("pass weights_init, means_init and variances_init together, or none of them")
        initial = _check_initial_params(k, weights_init, means_init, variances_init)
    return run_em(values, table, k=k, seed=seed, max_iter=max_iter, tol=tol, reg_covar=reg_covar, initial=initial)


def fit_gmm_ranks(comm, x, positions: list[tuple[int, int, int]], k: int = 5, *, seed: int = 0,
                  max_iter: int = 200, tol: float = 1e-3, reg_covar: float = 1e-6) -> GaussianMixture1D:
    """`fit_gmm(all ranks' values, k, seed=seed)` where this rank of `comm` holds `x`: the initialisation sample
    assembled by one all-reduce, each EM pass's 3k + 1 sums all-reduced. `positions` lists this rank's pieces as
    (global position of the first value, local index of the first value, length), numbering all ranks' values in
    the order one process would see them."""
    values, table = as_kernel_input(x, check_finite=True)
    n = int(comm.sum(np.array([values.shape[0]], dtype=np.int64), "count GMM values")[0])

    def sample_at(indices):
        sample = np.zeros(len(indices), dtype=np.float64)
        for global_start, local_start, length in positions:
            lo, hi = np.searchsorted(indices, [global_start, global_start + length])
            if hi > lo:
                sample[lo:hi] = _kernels.gather(values, table, indices[lo:hi] - global_start + local_start)
        return comm.sum(sample, "GMM initialisation sample")  # each position is held by one rank: exact

    def em_pass(v, t, log_coef, inv_two_var, mu):
        resp_sum, s1, s2, ll = _kernels.em_pass(v, t, log_coef, inv_two_var, mu)
        total = comm.sum(np.concatenate([resp_sum, s1, s2, [ll]]), "EM sufficient statistics")
        return total[:k], total[k:2 * k], total[2 * k:3 * k], float(total[3 * k])

    check_options(n, k, max_iter, tol, "kmeans", reg_covar)
    return run_em(values, table, k=k, seed=seed, max_iter=max_iter, tol=tol, reg_covar=reg_covar, n=n,
                  sample_at=sample_at, em_pass=em_pass)


def run_em(values, table, *, k: int, seed: int, max_iter: int, tol: float, reg_covar: float, n: int | None = None,
           sample_at=None, em_pass=_kernels.em_pass, initial=None) -> GaussianMixture1D:
    """The one EM driver behind fit_gmm, fit_gmm_ranks and gmm.device: initialise (from `initial`, or k-means on
    `sample_at(indices)`, the values at global positions `indices` of a systematic sample), run EM with
    `em_pass` (which may sum over more values than `values`; `n` counts them), score the final parameters.
    `values, table` come from `as_kernel_input`."""
    n = values.shape[0] if n is None else n
    if initial is None:
        rng = np.random.default_rng(seed)
        if sample_at is None:
            sample = _kernels.gather(values, table, _init_indices(n, rng))
        else:
            sample = sample_at(_init_indices(n, rng))
        initial = _init_from_sample(sample, rng, k, reg_covar, max_iter, tol)
    weights, means, variances, n_iter, converged = _run_em(values, table, *initial, reg_covar, max_iter, tol,
                                                           em_pass, n=n)
    # The fused pass also returns the log-likelihood; one more pass scores the final parameters.
    score = em_pass(values, table, *log_terms(weights, means, variances))[3] / n
    order = np.argsort(means, kind="stable")
    return GaussianMixture1D(weights=weights[order], means=means[order], variances=variances[order],
                             score=float(score), n_iter=n_iter, converged=converged)


def as_kernel_input(x, *, check_finite: bool):
    """A 1-D array the kernels read in place (float16 as its uint16 bits) and the float16 lookup table."""
    values = np.asarray(x)
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        raise InputError(f"x must be 1-D (or of shape (n, 1)), got shape {values.shape}: pass one score per sample")
    if values.dtype.kind not in "fiub":
        raise InputError(f"x must hold real numbers, got dtype {values.dtype}: convert it to float32 or float64")
    if not values.dtype.isnative or values.dtype.kind != "f" or values.dtype.itemsize not in (2, 4, 8):
        values = values.astype(np.float64)
    table = _NO_TABLE
    if values.dtype == np.float16:
        values, table = values.view(np.uint16), _HALF_TABLE
    if check_finite and values.shape[0]:
        bad = int(_kernels.count_nonfinite(values, table))
        if bad:
            raise InputError(f"x holds {bad} NaN or infinite values out of {values.shape[0]}: drop those rows "
                             f"(cfbd_fast.ops.invalid_rows finds them) before fitting")
    return values, table


def check_options(n, k, max_iter, tol, init, reg_covar):
    if not 1 <= k <= _kernels.MAX_COMPONENTS:
        raise InputError(f"k={k} components: choose 1 <= k <= {_kernels.MAX_COMPONENTS}")
    if n < k:
        raise InputError(f"x holds {n} values, fewer than the k={k} components: pass more data or a smaller k")
    if max_iter < 1:
        raise InputError(f"max_iter={max_iter}: EM needs at least one iteration")
    if not tol >= 0:
        raise InputError(f"tol={tol}: use a tolerance >= 0 (0 runs exactly max_iter iterations)")
    if not reg_covar > 0:
        raise InputError(f"reg_covar={reg_covar}: use a positive variance floor such as 1e-6")
    if init != "kmeans":
        raise InputError(f"init={init!r}: use 'kmeans', or pass weights_init, means_init and variances_init")


def _check_initial_params(k, weights_init, means_init, variances_init):
    params = []
    for name, p in (("weights_init", weights_init), ("means_init", means_init), ("variances_init", variances_init)):
        arr = np.array(p, dtype=np.float64).reshape(-1)
        if arr.shape != (k,) or not np.all(np.isfinite(arr)):
            raise InputError(f"{name} must hold {k} finite numbers, one per component")
        params.append(arr)
    weights, means, variances = params
    if np.any(weights <= 0) or abs(weights.sum() - 1.0) > 1e-6:
        raise InputError("weights_init must be positive and sum to 1")
    if np.any(variances <= 0):
        raise InputError("variances_init must be positive")
    return weights, means, variances


def log_terms(weights, means, variances):
    """Per component: log w - log sqrt(2 pi var), 1 / (2 var), mean; log p(x, c) = first - second * (x - mean)**2."""
    log_coef = np.log(weights) - _HALF_LOG_2PI - 0.5 * np.log(variances)
    return log_coef, 0.5 / variances, np.ascontiguousarray(means, dtype=np.float64)


def _m_step(resp_sum, shifted_sum, shifted_sq_sum, means, reg_covar):
    """scikit-learn's M-step from sums shifted by the old means: sum r, sum r (x - m), sum r (x - m)**2."""
    nk = resp_sum + _EPS10
    shift = shifted_sum / nk
    new_means = means + shift
    # sum r (x - m_new)**2 = sum r (x - m)**2 - 2 shift sum r (x - m) + shift**2 sum r
    spread = shifted_sq_sum - 2.0 * shift * shifted_sum + shift * shift * resp_sum
    variances = np.maximum(spread / nk, 0.0) + reg_covar
    return nk / nk.sum(), new_means, variances


def _run_em(values, table, weights, means, variances, reg_covar, max_iter, tol, em_pass=_kernels.em_pass,
            n=None):
    """EM from the given parameters; `em_pass` may sum over more values than `values` (then `n` counts them)."""
    n = values.shape[0] if n is None else n
    lower_bound = -np.inf
    converged = False
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        previous = lower_bound
        resp_sum, s1, s2, ll = em_pass(values, table, *log_terms(weights, means, variances))
        lower_bound = ll / n
        weights, means, variances = _m_step(resp_sum, s1, s2, means, reg_covar)
        if abs(lower_bound - previous) < tol:
            converged = True
            break
    return weights, means, variances, n_iter, converged


def _init_indices(n: int, rng: np.random.Generator) -> np.ndarray:
    """A systematic sample (every stride-th value from a random offset): covers sorted or grouped input evenly."""
    stride = max(n // INIT_SAMPLE, 1)
    return np.arange(int(rng.integers(stride)), n, stride)[:INIT_SAMPLE]


def _init_from_sample(sample, rng, k, reg_covar, max_iter, tol):
    """k-means++ / Lloyd on the sample (float64; sorted here), hard-assignment parameters, then EM on it."""
    sample.sort()
    prefix = np.concatenate(([0.0], np.cumsum(sample)))
    seeding = sample[::max(sample.shape[0] // KMEANS_SEEDING_SAMPLE, 1)]  # Lloyd then runs on the whole sample
    n_trials = 2 + int(math.log(k))
    best = None
    for _ in range(KMEANS_RESTARTS):
        seeds = _kernels.kmeans_plusplus(seeding, k, rng.random(), rng.random((max(k - 1, 0), n_trials)))
        centers, bounds, inertia = _kernels.lloyd_1d(sample, prefix, seeds, KMEANS_MAX_ITER)
        if best is None or inertia < best[2]:
            best = (centers, bounds, inertia)
    centers, bounds, _ = best
    counts = np.diff(bounds).astype(np.float64)
    spread = sample.var()
    means = centers.copy()
    variances = np.empty(k)
    for c in range(k):
        segment = sample[bounds[c]:bounds[c + 1]]
        if segment.size:
            means[c] = segment.mean()
            variances[c] = segment.var() + reg_covar
        else:
            variances[c] = spread + reg_covar
    nk = counts + _EPS10
    weights = nk / nk.sum()
    return _run_em(sample, _NO_TABLE, weights, means, variances, reg_covar, max_iter, tol * SAMPLE_TOL_FACTOR,
                   _kernels.em_pass_serial)[:3]
