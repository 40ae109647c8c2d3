"""One-stage baselines users compare against: CLIP-score filtering and SafeCLIP's 2-component GMM."""
from __future__ import annotations

import numpy as np

from ..gmm import fit_gmm


def cosine_score(s_o: np.ndarray) -> np.ndarray:
    """CLIP-score filtering: the lower the image-caption cosine, the more suspicious (score = 1 - s_o)."""
    return (1.0 - s_o).astype(np.float32)


def safeclip_score(s_o: np.ndarray, valid: np.ndarray, seed: int = 0, gmm=None) -> tuple[np.ndarray, dict]:
    """SafeCLIP: a 2-component GMM on the pair cosine; a pair is safe when the posterior of the higher-mean
    component is at least 0.9. Returns score = 1 - that posterior (flag score > 0.1) and the GMM summary.

    `gmm`: the mixture already fitted on s_o[valid] as float64 (over several processes); fitted here if None.
    """
    values = s_o[valid].astype(np.float64)
    if gmm is None:
        gmm = fit_gmm(values, k=2, seed=seed)
    upper = int(np.argmax(gmm.means))
    score = np.full(len(s_o), np.nan, dtype=np.float32)
    score[valid] = 1.0 - gmm.posterior(values, upper)
    info = {"weights": [float(w) for w in gmm.weights], "means": [float(m) for m in gmm.means],
            "variances": [float(v) for v in gmm.variances], "score": float(gmm.score),
            "safe_component": upper}
    return score, info
