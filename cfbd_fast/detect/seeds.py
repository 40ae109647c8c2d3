"""Seed set selection (the pairs the coarse stage calls poisoned) and the test for a coherent backdoor cluster.

`top`: the paper's top-q rows by consistency c. `dense`: among the top-M rows by c, the q whose captions lie
closest to their nearest fellow candidates; poisoned captions share one target, benign outliers rarely agree.
Ties are broken by row id, so the choice never depends on chunk size or thread count.
"""
from __future__ import annotations

import numpy as np


def top_rows(c: np.ndarray, valid: np.ndarray, m: int) -> np.ndarray:
    """Row ids of the `m` largest c among valid rows, ordered by (c descending, row id ascending)."""
    rows = np.flatnonzero(valid)
    m = min(m, len(rows))
    if m == 0:
        return rows[:0]
    values = c[rows]
    cut = np.partition(values, len(values) - m)[len(values) - m]
    cand = rows[values >= cut]  # includes every row tied with the cut
    order = np.lexsort((cand, -c[cand]))
    return cand[order][:m]


def normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def dense_rows(candidates: np.ndarray, captions: np.ndarray, q: int, neighbours: int = 10) -> np.ndarray:
    """The q candidates whose captions have the highest mean cosine to their `neighbours` nearest fellow candidates.

    `candidates` are row ids (any order), `captions` their caption embeddings in the same order.
    Returns row ids ordered by density descending, ties by row id.
    """
    m = len(candidates)
    q = min(q, m)
    if m <= 1:
        return candidates[:q]
    t = normalize_rows(captions)
    sim = t @ t.T
    np.fill_diagonal(sim, -np.inf)
    nn = min(neighbours, m - 1)
    nearest = -np.sort(-sim, axis=1)[:, :nn]
    density = nearest.mean(axis=1)
    order = np.lexsort((candidates, -density))
    return candidates[order][:q]


def pool_size(q: int, mode: str) -> int:
    """How many of the rows with the largest c the seed set is chosen from: q for `top`, max(20q, 1000) for
    `dense`."""
    return q if mode == "top" else max(20 * q, 1000)


def select_seeds(candidates: np.ndarray, candidate_c: np.ndarray, candidate_captions: np.ndarray | None, q: int,
                 mode: str, neighbours: int = 10) -> np.ndarray:
    """The seed set among `candidates` (the `pool_size` rows with the largest c; their c and, for `dense`, their
    captions in the same order) by `mode`."""
    if mode == "top":
        return candidates[np.lexsort((candidates, -candidate_c))][:q]
    return dense_rows(candidates, candidate_captions, q, neighbours)


def mean_pairwise_cosine(x: np.ndarray) -> float:
    """Mean cosine over distinct pairs of rows."""
    t = normalize_rows(x)
    n = len(t)
    if n < 2:
        return float("nan")
    s = t.sum(axis=0, dtype=np.float64)
    total = float(s @ s) - float(np.sum(t.astype(np.float64) ** 2))
    return total / (n * (n - 1))
