"""Coarse stage: a K-component GMM on the consistency scores splits rows into benign and the rest."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..gmm import fit_gmm


@dataclass
class CoarseSplit:
    posterior: np.ndarray  # float32 (n,): posterior of the lowest-mean component; NaN for invalid rows
    benign: np.ndarray  # bool (n,): posterior > gamma
    gmm: object  # the fitted cfbd_fast.gmm mixture
    lowest: int  # index of the lowest-mean component

    def gmm_summary(self) -> dict:
        return {
            "weights": [float(w) for w in self.gmm.weights],
            "means": [float(m) for m in self.gmm.means],
            "variances": [float(v) for v in self.gmm.variances],
            "score": float(self.gmm.score),
            "n_iter": int(self.gmm.n_iter),
            "converged": bool(self.gmm.converged),
            "lowest_component": int(self.lowest),
        }


def coarse_split(c: np.ndarray, valid: np.ndarray, *, k: int = 5, gamma: float = 0.9, seed: int = 0,
                 max_iter: int = 200, tol: float = 1e-3, device: str = "cpu") -> CoarseSplit:
    """Fit the GMM on the valid consistency scores; rows whose lowest-mean posterior exceeds `gamma` are benign.

    On a CUDA device the EM passes and the posteriors run there in torch (`gmm.device`), not in numba.
    """
    values = c[valid]
    if str(device).startswith("cuda"):
        from ..gmm.device import fit_gmm_device

        gmm = fit_gmm_device(values, k=k, seed=seed, max_iter=max_iter, tol=tol, device=device)
    else:
        gmm = fit_gmm(values, k=k, seed=seed, max_iter=max_iter, tol=tol)
    return split_by(gmm, c, valid, gamma=gamma, device=device)


def split_by(gmm, c: np.ndarray, valid: np.ndarray, *, gamma: float = 0.9, device: str = "cpu") -> CoarseSplit:
    """The split under a GMM already fitted on the valid c (by `coarse_split`, or over several processes).

    On a CUDA device the posteriors are computed there in torch (`gmm.device`).
    """
    values = c[valid]
    posterior = np.full(len(c), np.nan, dtype=np.float32)
    lowest = int(np.argmin(gmm.means))
    if str(device).startswith("cuda"):
        from ..gmm.device import posterior_on_device

        posterior[valid] = posterior_on_device(gmm, values, lowest, device)
    else:
        posterior[valid] = gmm.posterior(values, lowest)
    benign = np.zeros(len(c), dtype=bool)
    benign[valid] = posterior[valid] > gamma
    return CoarseSplit(posterior=posterior, benign=benign, gmm=gmm, lowest=lowest)
