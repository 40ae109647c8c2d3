"""1-D Gaussian mixtures fitted by EM with numba: `fit_gmm` returns a `GaussianMixture1D`."""
from .em import GaussianMixture1D, fit_gmm

__all__ = ["GaussianMixture1D", "fit_gmm"]
