"""numba kernels for the 1-D Gaussian mixture: one fused E+M pass per iteration, posteriors, and k-means seeding.

Parallel kernels split the samples into fixed chunks of `CHUNK` (independent of the thread count), keep float64
partial sums per chunk and reduce them in chunk order, so one thread and many threads give bitwise equal results.
"""
from __future__ import annotations

import os

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

CHUNK = 1 << 16  # samples per parallel work item; fixed so the reduction order never depends on threads
BLOCK = 64  # samples processed together inside a chunk (vectorised inner loops)
MAX_COMPONENTS = 1024  # a block's product of per-sample normalisers (each in [1, k]) must stay finite

# Reassociation lets LLVM vectorise the block loops; NaN/inf semantics stay exact (inputs are checked first).
_FAST = {"nsz", "arcp", "contract", "reassoc"}

_LOG2E = 1.4426950408889634
_LN2_HI = 0.6931471803691238  # Cody-Waite split of ln 2
_LN2_LO = 1.9082149292705877e-10
# Terms below exp(-600) ~ 1e-261 of a sample's largest are set to 0: they cannot change a float64 sum, and
# keeping them would drive products into subnormal numbers, which x86 processes ~100x slower.
_EXP_CUTOFF = -600.0

# Taylor coefficients 1/j! for exp(r), |r| <= ln2/2: truncation error < 1e-17 relative.
_C2, _C3, _C4, _C5 = 1 / 2, 1 / 6, 1 / 24, 1 / 120
_C6, _C7, _C8, _C9 = 1 / 720, 1 / 5040, 1 / 40320, 1 / 362880
_C10, _C11, _C12, _C13 = 1 / 3628800, 1 / 39916800, 1 / 479001600, 1 / 6227020800


def half_to_float64_table() -> np.ndarray:
    """float64 value of every float16 bit pattern; kernels read float16 input as uint16 and look it up here."""
    return np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64)


def _sample(x, i, half_table):
    """x[i] as float64 (float16 input arrives as its uint16 bits)."""


@overload(_sample)
def _sample_impl(x, i, half_table):
    if isinstance(x.dtype, types.Integer):
        return lambda x, i, half_table: half_table[x[i]]
    return lambda x, i, half_table: np.float64(x[i])


@njit(fastmath=_FAST)
def _load_block(x, start, count, half_table, values):
    for j in range(count):
        values[j] = _sample(x, start + j, half_table)


@njit(fastmath=_FAST)
def _block_joint(values, count, log_coef, half_prec, means, joint, top, total, pow2_bits, pow2):
    """joint[c, j] <- w_c N(x_j | c) / max_c(...), total[j] <- sum_c joint[c, j], top[j] <- the max log term."""
    k = means.shape[0]
    for j in range(count):
        top[j] = -np.inf
        total[j] = 0.0
    for c in range(k):
        mu = means[c]
        coef = log_coef[c]
        h = half_prec[c]
        for j in range(count):
            d = values[j] - mu
            a = coef - h * d * d
            joint[c, j] = a
            top[j] = max(top[j], a)
    for c in range(k):
        for j in range(count):
            # exp(t) for t <= 0 as 2**n * exp(r): vectorisable, unlike the libm call.
            t = joint[c, j] - top[j]
            keep = t > _EXP_CUTOFF
            t = max(t, _EXP_CUTOFF)
            n = np.floor(t * _LOG2E + 0.5)
            r = (t - n * _LN2_HI) - n * _LN2_LO
            p = _C13
            p = p * r + _C12
            p = p * r + _C11
            p = p * r + _C10
            p = p * r + _C9
            p = p * r + _C8
            p = p * r + _C7
            p = p * r + _C6
            p = p * r + _C5
            p = p * r + _C4
            p = p * r + _C3
            p = p * r + _C2
            p = p * r + 1.0
            p = p * r + 1.0
            joint[c, j] = p if keep else 0.0
            pow2_bits[j] = (np.int64(n) + 1023) << 52
        for j in range(count):
            e = joint[c, j] * pow2[j]
            joint[c, j] = e
            total[j] += e


@njit(fastmath=_FAST)
def _block_log_likelihood(top, total, count):
    """sum_j log sum_c w_c N(x_j | c) over the block, with one log per block (total[j] lies in [1, k])."""
    s = 0.0
    prod = 1.0
    for j in range(count):
        s += top[j]
        prod *= total[j]
    return s + np.log(prod)


@njit(fastmath=_FAST)
def _block_responsibilities(joint, total, count):
    """joint[c, j] <- p(c | x_j) in place; every kernel normalises here, so their posteriors agree bit for bit."""
    for j in range(count):
        total[j] = 1.0 / total[j]
    for c in range(joint.shape[0]):
        for j in range(count):
            joint[c, j] *= total[j]


@njit
def _alloc_scratch(k):
    """Per-chunk work arrays: block values, joint terms (k, BLOCK), max, normaliser, and 2**n bits/float views."""
    values = np.empty(BLOCK)
    joint = np.empty((k, BLOCK))
    top = np.empty(BLOCK)
    total = np.empty(BLOCK)
    pow2_bits = np.empty(BLOCK, dtype=np.int64)
    pow2 = pow2_bits.view(np.float64)
    return values, joint, top, total, pow2_bits, pow2


def _em_pass(x, half_table, log_coef, half_prec, means):
    """One fused E+M pass over all samples for the current parameters.

    Returns (resp_sum, shifted_sum, shifted_sq_sum, log_likelihood_sum): per component c, sum_i r_ic,
    sum_i r_ic (x_i - mu_c) and sum_i r_ic (x_i - mu_c)**2 (shifted by the current means for accuracy),
    and sum_i log p(x_i). Sums are float64, per chunk, reduced in chunk order.
    """
    n = x.shape[0]
    k = means.shape[0]
    n_chunks = (n + CHUNK - 1) // CHUNK
    part_resp = np.zeros((n_chunks, k))
    part_s1 = np.zeros((n_chunks, k))
    part_s2 = np.zeros((n_chunks, k))
    part_ll = np.zeros(n_chunks)
    for chunk in prange(n_chunks):
        values, joint, top, total, pow2_bits, pow2 = _alloc_scratch(k)
        stop = min((chunk + 1) * CHUNK, n)
        for start in range(chunk * CHUNK, stop, BLOCK):
            count = min(BLOCK, stop - start)
            _load_block(x, start, count, half_table, values)
            _block_joint(values, count, log_coef, half_prec, means, joint, top, total, pow2_bits, pow2)
            part_ll[chunk] += _block_log_likelihood(top, total, count)
            _block_responsibilities(joint, total, count)
            for c in range(k):
                mu = means[c]
                acc_r = 0.0
                acc_1 = 0.0
                acc_2 = 0.0
                for j in range(count):
                    r = joint[c, j]
                    d = values[j] - mu
                    rd = r * d
                    acc_r += r
                    acc_1 += rd
                    acc_2 += rd * d
                part_resp[chunk, c] += acc_r
                part_s1[chunk, c] += acc_1
                part_s2[chunk, c] += acc_2
    resp_sum = np.zeros(k)
    s1 = np.zeros(k)
    s2 = np.zeros(k)
    ll = 0.0
    for chunk in range(n_chunks):
        ll += part_ll[chunk]
        for c in range(k):
            resp_sum[c] += part_resp[chunk, c]
            s1[c] += part_s1[chunk, c]
            s2[c] += part_s2[chunk, c]
    return resp_sum, s1, s2, ll


em_pass_parallel = njit(parallel=True, fastmath=_FAST)(_em_pass)
# The same pass on one thread, cached: k-means initialisation runs EM on a small sample, where threads cost more
# than they save. Which of the two runs there never depends on the thread count.
em_pass_serial = njit(fastmath=_FAST, cache=True)(_em_pass)


def parallel_threads() -> int:
    """numba's thread count; the first call starts its thread pool with OpenMP's passive wait policy.

    OpenMP threads spin by default while they wait. With more runnable threads than cores (other jobs on the
    machine) a thread spinning at a pass's barrier holds a core that the thread it waits for needs: the parallel
    fit then ran about 3.5x slower than with passive waits (benchmarks/RESULTS.md). The policy is read once, when
    libgomp loads, so it is set for that moment only, unless the user set one; a pool started before (for
    example by numba.set_num_threads) keeps its own.
    """
    from numba.np.ufunc import parallel

    # numba's own (private) start-up; without it, as in a numba that renamed it, the pool starts as numba's default.
    if not getattr(parallel, "_is_initialized", True) and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        try:
            parallel._launch_threads()
        finally:
            del os.environ["OMP_WAIT_POLICY"]
    return numba.get_num_threads()


def em_pass(x, half_table, log_coef, half_prec, means):
    """The fused pass: the parallel kernel when numba may use several threads, else the cached serial one.

    A parallel kernel cannot be cached (numba issue 7522), so each new process compiles it (seconds); with one
    thread it would gain nothing, and the serial kernel loads from the cache instead. Both reduce in chunk order.
    """
    kernel = em_pass_parallel if parallel_threads() > 1 else em_pass_serial
    return kernel(x, half_table, log_coef, half_prec, means)


# What `evaluate` writes per sample.
LOG_LIKELIHOOD, POSTERIOR, PROBA = 0, 1, 2


def _evaluate(x, half_table, log_coef, half_prec, means, what, component, out):
    """Per-sample results of a fitted mixture into `out` (n, m): LOG_LIKELIHOOD: out[i, 0] = log p(x_i);
    POSTERIOR: out[i, 0] = p(component | x_i); PROBA: out[i, c] = p(c | x_i) for every component."""
    n = x.shape[0]
    k = means.shape[0]
    n_chunks = (n + CHUNK - 1) // CHUNK
    for chunk in prange(n_chunks):
        values, joint, top, total, pow2_bits, pow2 = _alloc_scratch(k)
        stop = min((chunk + 1) * CHUNK, n)
        for start in range(chunk * CHUNK, stop, BLOCK):
            count = min(BLOCK, stop - start)
            _load_block(x, start, count, half_table, values)
            _block_joint(values, count, log_coef, half_prec, means, joint, top, total, pow2_bits, pow2)
            if what == LOG_LIKELIHOOD:
                for j in range(count):
                    out[start + j, 0] = top[j] + np.log(total[j])
                continue
            _block_responsibilities(joint, total, count)
            for j in range(count):
                if what == POSTERIOR:
                    out[start + j, 0] = joint[component, j]
                else:
                    for c in range(k):
                        out[start + j, c] = joint[c, j]


evaluate_parallel = njit(parallel=True, fastmath=_FAST)(_evaluate)
evaluate_serial = njit(fastmath=_FAST, cache=True)(_evaluate)


def evaluate(x, half_table, log_coef, half_prec, means, what, component, out):
    """Per-sample results of a fitted mixture (see `_evaluate`): parallel or cached serial, as `em_pass`."""
    kernel = evaluate_parallel if parallel_threads() > 1 else evaluate_serial
    kernel(x, half_table, log_coef, half_prec, means, what, component, out)


@njit(cache=True)
def count_nonfinite(x, half_table):
    """Number of NaN or +-inf samples (one serial pass; memory-bound)."""
    bad = 0
    for i in range(x.shape[0]):
        if not np.isfinite(_sample(x, i, half_table)):
            bad += 1
    return bad


@njit(cache=True)
def gather(x, half_table, indices):
    """float64 copy of x[indices] (indices sorted, for locality on memory-mapped input)."""
    out = np.empty(indices.shape[0])
    for j in range(indices.shape[0]):
        out[j] = _sample(x, indices[j], half_table)
    return out


@njit(cache=True)
def kmeans_plusplus(sorted_x, k, first_uniform, trial_uniforms):
    """Greedy k-means++ seeding (as scikit-learn's): each new centre is the best of several D^2-sampled trials.

    `first_uniform` picks the first centre; `trial_uniforms` is (k - 1, n_trials) of uniforms in [0, 1).
    """
    n = sorted_x.shape[0]
    centers = np.empty(k)
    centers[0] = sorted_x[min(int(first_uniform * n), n - 1)]
    closest = np.empty(n)
    potential = 0.0
    for i in range(n):
        d = sorted_x[i] - centers[0]
        closest[i] = d * d
        potential += closest[i]
    cumulative = np.empty(n)
    candidate_dist = np.empty(n)
    best_dist = np.empty(n)
    for c in range(1, k):
        acc = 0.0
        for i in range(n):
            acc += closest[i]
            cumulative[i] = acc
        best_potential = np.inf
        best_center = centers[0]
        for t in range(trial_uniforms.shape[1]):
            target = trial_uniforms[c - 1, t] * potential
            idx = min(np.searchsorted(cumulative, target), n - 1)
            candidate = sorted_x[idx]
            pot = 0.0
            for i in range(n):
                d = sorted_x[i] - candidate
                candidate_dist[i] = min(closest[i], d * d)
                pot += candidate_dist[i]
            if pot < best_potential:
                best_potential = pot
                best_center = candidate
                best_dist[:] = candidate_dist
        centers[c] = best_center
        closest[:] = best_dist
        potential = best_potential
    return centers


@njit(cache=True)
def lloyd_1d(sorted_x, prefix, centers, max_iter):
    """Lloyd's k-means on sorted 1-D data using prefix sums: each iteration costs O(k log n).

    In 1-D the clusters of sorted centres are contiguous runs split at the midpoints between centres.
    Returns (sorted centres, cluster boundaries (k + 1,), inertia). An empty cluster keeps its centre.
    """
    n = sorted_x.shape[0]
    k = centers.shape[0]
    centers = np.sort(centers)
    bounds = np.empty(k + 1, dtype=np.int64)
    bounds[0] = 0
    bounds[k] = n
    for _ in range(max_iter):
        for c in range(1, k):
            bounds[c] = np.searchsorted(sorted_x, 0.5 * (centers[c - 1] + centers[c]), side="right")
        moved = False
        for c in range(k):
            lo = bounds[c]
            hi = bounds[c + 1]
            if hi > lo:
                new = (prefix[hi] - prefix[lo]) / (hi - lo)
                if new != centers[c]:
                    moved = True
                    centers[c] = new
        centers = np.sort(centers)
        if not moved:
            break
    for c in range(1, k):
        bounds[c] = np.searchsorted(sorted_x, 0.5 * (centers[c - 1] + centers[c]), side="right")
    inertia = 0.0
    for c in range(k):
        for i in range(bounds[c], bounds[c + 1]):
            d = sorted_x[i] - centers[c]
            inertia += d * d
    return centers, bounds, inertia
