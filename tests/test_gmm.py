"""cfbd_fast.gmm against scikit-learn's GaussianMixture: exact EM parity, default-fit quality, determinism, inputs."""
from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
import warnings
import numba
import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from cfbd_fast.errors import InputError
from cfbd_fast.gmm import GaussianMixture1D, fit_gmm

from gmm_data import consistency_like, dataset  # the data sets, shared with test_gmm_device.py


def sklearn_from_params(weights, means, variances, n_iter=1, reg_covar=1e-6, tol=0.0):
    return GaussianMixture(len(weights), covariance_type="full", reg_covar=reg_covar, tol=tol, max_iter=n_iter,
                           weights_init=weights, means_init=np.asarray(means)[:, None],
                           precisions_init=(1.0 / np.asarray(variances))[:, None, None])


def sklearn_params(gm):
    order = np.argsort(gm.means_.ravel(), kind="stable")
    return gm.weights_[order], gm.means_.ravel()[order], gm.covariances_.ravel()[order]


def start_params(x, k, seed):
    """Deliberately rough starting parameters: quantile means, equal weights, the overall variance."""
    rng = np.random.default_rng(seed)
    means = np.quantile(x, np.sort(rng.uniform(0.05, 0.95, k)))
    return np.full(k, 1.0 / k), means, np.full(k, x.var())


@pytest.mark.parametrize("name,k,n_iter,reg_covar", [
    ("consistency", 5, 25, 1e-6), ("separated", 5, 15, 1e-6), ("lognormal", 4, 30, 1e-6),
    ("overlap", 3, 40, 1e-3), ("poisoned", 2, 20, 1e-6), ("separated", 1, 3, 1e-6),
])
def test_em_matches_sklearn_from_identical_start(name, k, n_iter, reg_covar):
    x = dataset(name, 40_000, seed=1)
    weights, means, variances = start_params(x, k, seed=2)
    ours = fit_gmm(x, k, max_iter=n_iter, tol=0.0, reg_covar=reg_covar,
                   weights_init=weights, means_init=means, variances_init=variances)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref = sklearn_from_params(weights, means, variances, n_iter, reg_covar).fit(x[:, None])
    ref_weights, ref_means, ref_variances = sklearn_params(ref)
    np.testing.assert_allclose(ours.weights, ref_weights, rtol=1e-6)
    np.testing.assert_allclose(ours.means, ref_means, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(ours.variances, ref_variances, rtol=1e-6)
    assert abs(ours.score - ref.score(x[:, None])) <= 1e-8
    assert (ours.n_iter, ours.converged) == (ref.n_iter_, ref.converged_) == (n_iter, False)


@pytest.mark.parametrize("name,tol", [("separated", 1e-3), ("overlap", 1e-4), ("consistency", 1e-2)])
def test_stopping_rule_matches_sklearn(name, tol):
    x = dataset(name, 30_000, seed=3)
    weights, means, variances = start_params(x, 4, seed=4)
    ours = fit_gmm(x, 4, max_iter=500, tol=tol, weights_init=weights, means_init=means, variances_init=variances)
    ref = sklearn_from_params(weights, means, variances, n_iter=500, tol=tol).fit(x[:, None])
    assert (ours.n_iter, ours.converged) == (ref.n_iter_, True)
    assert abs(ours.score - ref.score(x[:, None])) <= 1e-8


@pytest.mark.parametrize("name,n", [
    ("consistency", 300_000), ("consistency", 50_000), ("separated", 50_000),
    ("lognormal", 50_000), ("overlap", 50_000), ("poisoned", 50_000),
])
def test_default_fit_scores_at_least_sklearn(name, n):
    x = dataset(name, n)
    ours = fit_gmm(x, 5, tol=1e-3)
    ref = GaussianMixture(5, covariance_type="full", tol=1e-3, random_state=0).fit(x[:, None])
    assert ours.score >= ref.score(x[:, None]) - 1e-4
    assert ours.converged
    assert np.all(np.diff(ours.means) >= 0) and abs(ours.weights.sum() - 1) < 1e-12


def test_serial_and_parallel_runs_are_bitwise_equal():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has a single thread here")
    x = consistency_like(400_003, seed=5).astype(np.float64)  # several chunks and a ragged last block
    previous = numba.get_num_threads()
    runs = []
    try:
        for threads in (1, numba.config.NUMBA_NUM_THREADS):
            numba.set_num_threads(threads)
            gm = fit_gmm(x, 5, seed=7)
            runs.append((gm, gm.posterior(x, 0), gm.predict_proba(x[:5000]), gm.score_samples(x[:5000]),
                         gm.mean_log_likelihood(x)))
    finally:
        numba.set_num_threads(previous)
    (serial, *serial_out), (parallel, *parallel_out) = runs
    for field in ("weights", "means", "variances"):
        assert np.array_equal(getattr(serial, field), getattr(parallel, field))
    assert (serial.score, serial.n_iter) == (parallel.score, parallel.n_iter)
    for a, b in zip(serial_out, parallel_out):
        assert np.array_equal(a, b)


_WAIT_POLICY_SCRIPT = """
import os, sys, numpy as np
from cfbd_fast.gmm import _kernels, fit_gmm
if sys.argv[1] == "fit":
    fit_gmm(np.random.default_rng(0).normal(size=1000), 2)
else:  # starting the pool alone: no parallel kernel to compile
    _kernels.parallel_threads()
print("left:", os.environ.get("OMP_WAIT_POLICY"))
"""


@pytest.mark.parametrize("user_policy,call", [(None, "fit"), ("active", "pool")])
def test_parallel_pool_waits_passively_unless_the_user_chose(user_policy, call):
    """A new process's first parallel pass starts libgomp with OMP_WAIT_POLICY=PASSIVE, without leaving the variable
    set; a policy the user set is kept. libgomp prints what it read: unset, it also says PASSIVE but spins 300,000
    times before it sleeps; only the explicit policy makes that spin count 0."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(OMP_DISPLAY_ENV="VERBOSE", NUMBA_NUM_THREADS="2", NUMBA_THREADING_LAYER="omp")
    if user_policy:
        env["OMP_WAIT_POLICY"] = user_policy
    out = subprocess.run([sys.executable, "-c", _WAIT_POLICY_SCRIPT, call], capture_output=True, text=True, env=env)
    if out.returncode != 0 and "threading layer" in out.stderr.lower():
        pytest.skip("numba's OpenMP threading layer is not available here")
    assert out.returncode == 0, out.stderr
    if user_policy:
        assert "OMP_WAIT_POLICY = 'ACTIVE'" in out.stderr
    else:
        assert "OMP_WAIT_POLICY = 'PASSIVE'" in out.stderr and "GOMP_SPINCOUNT = '0'" in out.stderr
    assert f"left: {user_policy}" in out.stdout


def test_same_seed_same_fit_and_seed_is_used():
    x = dataset("overlap", 200_000)
    a, b, c = fit_gmm(x, 3, seed=11), fit_gmm(x, 3, seed=11), fit_gmm(x, 3, seed=12)
    assert np.array_equal(a.means, b.means) and a.score == b.score
    assert not np.array_equal(a.means, c.means)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_dtypes_fit_the_values_they_hold(dtype):
    x = consistency_like(150_000, seed=6).astype(dtype)
    ours = fit_gmm(x, 5)
    as_float64 = fit_gmm(x.astype(np.float64), 5)
    np.testing.assert_allclose(ours.means, as_float64.means, rtol=1e-12)
    np.testing.assert_allclose(ours.variances, as_float64.variances, rtol=1e-12)
    assert ours.score == pytest.approx(as_float64.score, rel=1e-12)
    np.testing.assert_allclose(ours.posterior(x, 0), as_float64.posterior(x.astype(np.float64), 0),
                               rtol=1e-12, atol=1e-15)


def test_read_only_memmap_is_read_in_place(tmp_path):
    x = consistency_like(2_000_000, seed=8)
    path = tmp_path / "scores.f32"
    x.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r")
    assert not mapped.flags.writeable
    fit_gmm(mapped[:1000], 5).posterior(mapped[:1000], 0)  # compile outside the measurement
    tracemalloc.start()
    gm = fit_gmm(mapped, 5)
    post = gm.posterior(mapped, 0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # The posterior output (8 bytes a value) is the one array of size n; a float64 copy of x would double that.
    assert peak < post.nbytes + 6_000_000
    reference = fit_gmm(np.array(x), 5)
    assert np.array_equal(gm.means, reference.means) and gm.score == reference.score


def test_predict_proba_and_posterior_match_sklearn():
    x = dataset("consistency", 20_000, seed=9)
    gm = fit_gmm(x, 5)
    ref = GaussianMixture(5, covariance_type="full")
    ref.weights_, ref.means_ = gm.weights, gm.means[:, None]
    ref.covariances_ = gm.variances[:, None, None]
    ref.precisions_cholesky_ = 1.0 / np.sqrt(ref.covariances_)
    proba = gm.predict_proba(x)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(proba, ref.predict_proba(x[:, None]), rtol=1e-9, atol=1e-13)
    for component in range(5):
        np.testing.assert_array_equal(gm.posterior(x, component), proba[:, component])
    np.testing.assert_allclose(gm.score_samples(x), ref.score_samples(x[:, None]), rtol=1e-12, atol=1e-12)
    assert gm.mean_log_likelihood(x) == pytest.approx(ref.score(x[:, None]), abs=1e-10)
    assert gm.mean_log_likelihood(x) == pytest.approx(gm.score, abs=1e-12)


def test_far_samples_keep_finite_posteriors():
    gm = GaussianMixture1D(weights=np.array([0.5, 0.5]), means=np.array([0.0, 1.0]),
                           variances=np.array([1e-6, 1e-6]), score=0.0, n_iter=0, converged=True)
    x = np.array([-1e3, 0.4, 0.6, 1e3, 1e150])  # log densities down to -1e305
    proba = gm.predict_proba(x)
    assert np.all(np.isfinite(proba))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(proba[:4].argmax(axis=1), [0, 0, 1, 1])
    assert np.all(np.isfinite(gm.score_samples(x)))


def test_constant_data_gets_the_variance_floor():
    gm = fit_gmm(np.full(1000, 0.25, dtype=np.float32), 5, reg_covar=1e-6)
    np.testing.assert_allclose(gm.means, 0.25)
    np.testing.assert_allclose(gm.variances, 1e-6)
    assert gm.converged and np.isfinite(gm.score)
    assert gm.score == pytest.approx(-0.5 * np.log(2 * np.pi * 1e-6), rel=1e-9)


def test_tiny_cluster_variance_is_floored_at_reg_covar():
    rng = np.random.default_rng(10)
    x = np.concatenate([np.full(5000, 30.0), rng.normal(0.0, 1.0, 5000)])
    gm = fit_gmm(x, 2, reg_covar=1e-4)
    assert gm.variances[1] == pytest.approx(1e-4, rel=1e-9)
    assert gm.means[1] == pytest.approx(30.0, rel=1e-12)


def test_single_component_is_mean_and_variance():
    x = dataset("lognormal", 10_000)
    gm = fit_gmm(x, 1, reg_covar=1e-6)
    assert gm.weights[0] == 1.0
    assert gm.means[0] == pytest.approx(x.mean(), rel=1e-12)
    assert gm.variances[0] == pytest.approx(x.var() + 1e-6, rel=1e-10)
    assert gm.converged and gm.n_iter == 2


def test_accepts_column_vectors_and_integers():
    x = np.arange(100) % 7
    a, b = fit_gmm(x, 3), fit_gmm(x.astype(np.float64)[:, None], 3)
    assert np.array_equal(a.means, b.means)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_non_finite_values_are_refused_with_their_count(bad, dtype):
    x = dataset("overlap", 500).astype(dtype)
    x[[3, 70, 499]] = bad
    with pytest.raises(InputError, match="holds 3 NaN or infinite values out of 500"):
        fit_gmm(x, 3)


@pytest.mark.parametrize("kwargs,message", [
    ({"x": np.arange(4.0), "k": 5}, "fewer than the k=5 components"),
    ({"x": np.empty(0), "k": 1}, "holds 0 values"),
    ({"x": np.arange(10.0), "k": 0}, "choose 1 <= k"),
    ({"x": np.ones((5, 2)), "k": 1}, "must be 1-D"),
    ({"x": np.array(["a", "b"]), "k": 1}, "must hold real numbers"),
    ({"x": np.arange(10.0), "k": 2, "reg_covar": 0.0}, "positive variance floor"),
    ({"x": np.arange(10.0), "k": 2, "tol": -1.0}, "tolerance >= 0"),
    ({"x": np.arange(10.0), "k": 2, "max_iter": 0}, "at least one iteration"),
    ({"x": np.arange(10.0), "k": 2, "init": "random"}, "use 'kmeans'"),
    ({"x": np.arange(10.0), "k": 2, "means_init": [0.0, 1.0]}, "together"),
    ({"x": np.arange(10.0), "k": 2, "weights_init": [0.5, 0.6], "means_init": [0, 1], "variances_init": [1, 1]},
     "sum to 1"),
    ({"x": np.arange(10.0), "k": 2, "weights_init": [0.5, 0.5], "means_init": [0, 1], "variances_init": [1, 0]},
     "variances_init must be positive"),
    ({"x": np.arange(10.0), "k": 2, "weights_init": [1.0], "means_init": [0, 1], "variances_init": [1, 1]},
     "weights_init must hold 2 finite numbers"),
])
def test_bad_arguments_raise_input_error(kwargs, message):
    with pytest.raises(InputError, match=message):
        fit_gmm(**kwargs)


def test_posterior_checks_the_component():
    gm = fit_gmm(dataset("overlap", 1000), 3)
    with pytest.raises(InputError, match="out of range"):
        gm.posterior(np.zeros(3), 3)
