"""Fine stage: the score that ranks pairs against a seed set, and the relative coherence scale."""
from __future__ import annotations

import numpy as np



def fine_score(z: np.ndarray, s_o: np.ndarray, kind: str) -> np.ndarray:
    """`z`: the paper's textual correlation with the seed captions. `z-so`: z minus the pair's own
    image-caption agreement, so that genuine target-class pairs (high z, high s_o) stay below poisons
    (high z, low s_o)."""
    if kind == "z":
        return z.astype(np.float32, copy=True)
    return (z - s_o).astype(np.float32)


def relative_coherence(coherence, null_coherence: float):
    """Where a cosine lies between that of random rows (0) and identical rows (1)."""
    return (coherence - null_coherence) / max(1.0 - null_coherence, 1e-9)
