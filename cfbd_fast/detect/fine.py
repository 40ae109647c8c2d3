"""Fine stage: which score ranks the suspicious pairs, and the verdict rules of each method."""
from __future__ import annotations

import numpy as np

SCORES = ("z-so", "z")


def fine_score(z: np.ndarray, s_o: np.ndarray, kind: str) -> np.ndarray:
    """`z`: the paper's textual correlation with the seed captions. `z-so`: z minus the pair's own
    image-caption agreement, so that genuine target-class pairs (high z, high s_o) stay below poisons
    (high z, low s_o)."""
    if kind == "z":
        return z.astype(np.float32, copy=True)
    if kind == "z-so":
        return (z - s_o).astype(np.float32)
    raise ValueError(f"unknown fine-stage score {kind!r}: use one of {', '.join(SCORES)}")


def prune_to_cluster(seed_rows: np.ndarray, seed_captions: np.ndarray, null_coherence: float,
                     min_relative: float = 0.5) -> np.ndarray:
    """Keep the seeds that belong to the caption cluster around the seed set's medoid.

    The medoid is the seed with the highest total cosine to the other seeds. A seed stays when its cosine
    to the medoid is at least `min_relative` of the way from the cosine of random captions
    (`null_coherence`) to identity. With fewer poisons than q this drops the benign fillers; on clean data
    it leaves almost nothing. Returns a boolean mask over `seed_rows`.
    """
    if len(seed_rows) == 0:
        return np.zeros(0, dtype=bool)
    t = seed_captions / np.maximum(np.linalg.norm(seed_captions, axis=1, keepdims=True), 1e-12)
    sim = t @ t.T
    medoid = int(np.argmax(sim.sum(axis=1)))
    relative = (sim[medoid] - null_coherence) / max(1.0 - null_coherence, 1e-9)
    return relative >= min_relative
