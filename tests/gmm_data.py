"""The 1-D data sets the GMM tests fit (test_gmm.py against scikit-learn, test_gmm_device.py against fit_gmm)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_gmm import consistency_like  # noqa: E402  (the benchmark's own data, so the tests cover it)


def dataset(name: str, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if name == "consistency":
        return consistency_like(n, seed).astype(np.float64)
    if name == "separated":
        c = rng.integers(0, 5, n)
        return np.array([-4.0, -1.0, 0.5, 3.0, 8.0])[c] + rng.normal(0, 1, n) * np.array([0.3, 0.5, 0.2, 1.0, 0.7])[c]
    if name == "lognormal":
        return rng.lognormal(0.0, 1.0, n)
    if name == "overlap":
        return np.array([0.0, 0.5, 1.0])[rng.integers(0, 3, n)] + rng.normal(0, 0.4, n)
    if name == "poisoned":
        n_poison = n // 100
        return rng.permutation(np.concatenate([np.abs(rng.normal(0.05, 0.03, n - n_poison)),
                                               rng.normal(0.3, 0.02, n_poison)]))
    raise ValueError(name)
