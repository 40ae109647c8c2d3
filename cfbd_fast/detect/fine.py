"""Fine stage: which score ranks the suspicious pairs, and the verdict rules of each method."""
from __future__ import annotations

import numpy as np

from .seeds import mean_pairwise_cosine


def fine_score(z: np.ndarray, s_o: np.ndarray, kind: str) -> np.ndarray:
    """`z`: the paper's textual correlation with the seed captions. `z-so`: z minus the pair's own
    image-caption agreement, so that genuine target-class pairs (high z, high s_o) stay below poisons
    (high z, low s_o)."""
    if kind == "z":
        return z.astype(np.float32, copy=True)
    return (z - s_o).astype(np.float32)


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
    return relative_coherence(sim[medoid], null_coherence) >= min_relative


def relative_coherence(coherence, null_coherence: float):
    """Where a cosine lies between that of random rows (0) and identical rows (1)."""
    return (coherence - null_coherence) / max(1.0 - null_coherence, 1e-9)


def cluster_verdict(n_members: int, min_members: int, image_coherence: float, null_image_coherence: float,
                    max_relative: float = 0.5) -> dict:
    """Is the seed caption cluster a backdoor? The trigger-and-target poisoning CFBD addresses pairs one caption
    with many unrelated images. A caption cluster whose images are near-identical too is a duplicate family
    (a product shot with its shop's boilerplate), not a planted target: its members' images are compared with
    random images on the same relative scale as the captions."""
    relative_image = float(relative_coherence(image_coherence, null_image_coherence)) if n_members > 1 else 0.0
    if n_members < min_members:
        found, reason = False, f"only {n_members} seed captions agree (need {min_members})"
    elif relative_image >= max_relative:
        found, reason = False, (f"the {n_members} agreeing seed captions describe near-identical images "
                                "(a duplicate family, not a trigger)")
    else:
        found, reason = True, f"{n_members} seed captions share one target over unrelated images"
    return {"found": found, "reason": reason, "image_coherence": image_coherence,
            "null_image_coherence": null_image_coherence, "relative_image_coherence": relative_image}


def find_backdoor_cluster(seed_rows: np.ndarray, seed_captions: np.ndarray, seed_images: np.ndarray,
                          null_coherence: float, null_image_coherence: float, min_members: int,
                          max_relative: float = 0.5) -> tuple[np.ndarray, dict]:
    """Examine the seed set's caption clusters, densest first, until one is a backdoor; duplicate families are
    set aside. Returns the rows of the last cluster examined and its verdict (`found`, `reason`, ...)."""
    remaining = np.arange(len(seed_rows))
    examined = 0
    while True:
        in_cluster = prune_to_cluster(seed_rows[remaining], seed_captions[remaining], null_coherence, max_relative)
        members = remaining[in_cluster]
        examined += 1
        info = cluster_verdict(n_members=len(members), min_members=min_members,
                               image_coherence=mean_pairwise_cosine(seed_images[members]),
                               null_image_coherence=null_image_coherence, max_relative=max_relative)
        remaining = remaining[~in_cluster]
        if info["found"] or len(members) < min_members or len(remaining) == 0:
            break
    info["clusters_examined"] = examined
    return seed_rows[members], info
