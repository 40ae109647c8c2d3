"""The simple baseline `cfbd` has to beat (bench_quality.py's `simple` arm): a self-fitted ridge mapper, one seed
cluster among the least consistent rows, score z - s_o, a robust normal null and a Bonferroni cut over rows."""
from __future__ import annotations

from statistics import NormalDist

import numpy as np


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def ridge_self_fit(image: np.ndarray, text: np.ndarray, lam: float = 1.0, trim: float = 0.05) -> np.ndarray:
    """F(I) = I W with W the ridge fit of T on I; refit without the `trim` fraction of rows with the largest
    residual. Returns F(I) for every row."""
    def fit(rows):
        x, y = image[rows], text[rows]
        return np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y)

    w = fit(np.arange(len(image)))
    residual = np.sum((image @ w - text) ** 2, axis=1)
    w = fit(np.argsort(residual)[:len(image) - int(trim * len(image))])
    return image @ w


def simple_scores(image: np.ndarray, text: np.ndarray, pool: int = 100, seeds: int = 10, alpha: float = 0.05) -> dict:
    """Per-row c, s_o, z, score and verdict of the baseline on L2-normalised embeddings (N x D each)."""
    from cfbd_fast.ops import consistency

    image = _normalise(np.asarray(image, dtype=np.float32))
    text = _normalise(np.asarray(text, dtype=np.float32))
    generated = ridge_self_fit(image.astype(np.float64), text.astype(np.float64)).astype(np.float32)
    c, s_o, _ = (np.asarray(a, dtype=np.float64) for a in consistency(image, text, generated))
    least = np.argsort(-np.nan_to_num(c, nan=-np.inf))[:pool]           # the least consistent rows
    sim = text[least] @ text[least].T
    np.fill_diagonal(sim, -np.inf)
    density = np.sort(sim, axis=1)[:, -(seeds - 1):].mean(axis=1)       # each caption's closeness to its 9 nearest
    centre = int(np.argmax(density))
    chosen = least[np.r_[centre, np.argsort(-sim[centre])[:seeds - 1]]]  # the densest caption and its neighbours
    mean = _normalise(text[chosen].mean(axis=0, keepdims=True))[0]
    z = text @ mean
    score = z - s_o
    median = np.median(score)
    scale = 1.4826 * np.median(np.abs(score - median))
    cut = median + scale * NormalDist().inv_cdf(1 - alpha / len(score))  # one-sided Bonferroni over rows
    return dict(c=c, s_o=s_o, z=z, score=score, flagged=score > cut, cut=cut, seeds=chosen)
