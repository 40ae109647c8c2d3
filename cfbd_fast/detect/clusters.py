"""Every candidate caption cluster, examined: how the seed pool splits into clusters, and each cluster's evidence.

A backdoor pairs one target caption (or a few paraphrases) with many images that do not show it. Among the
rows with the largest consistency c, the target's captions therefore form a tight caption cluster. So can a
genuine group: one caption shared by many different images (stock-photo and boilerplate captions), or a
duplicate family (near-identical images with one caption). Each cluster gets measured statistics, so that
the verdict rests on them and not on the order in which clusters were found.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .fine import relative_coherence
from .seeds import mean_pairwise_cosine, normalize_rows


@dataclass
class Cluster:
    """One caption cluster of the seed pool: its rows (densest first) and its statistics."""
    rows: np.ndarray  # store row ids, most central first
    stats: dict = field(default_factory=dict)
    seed_captions: np.ndarray | None = None  # caption embeddings of seed_rows(q), for pass 2

    def seed_rows(self, q: int) -> np.ndarray:
        """The cluster's fine-stage seeds: its q most central rows."""
        return self.rows[:q]


def caption_clusters(candidates: np.ndarray, captions: np.ndarray, null_coherence: float, *, min_members: int,
                     min_relative: float = 0.5) -> list[Cluster]:
    """Split the candidate rows into caption clusters, densest first.

    Two captions are linked when their cosine is at least `min_relative` of the way from the cosine of random
    captions (`null_coherence`) to identity. The densest remaining caption (most links; ties by row id) and
    the remaining captions linked to it form a cluster; this repeats while a cluster has `min_members`.
    """
    if len(candidates) == 0:
        return []
    t = normalize_rows(captions)
    linked = relative_coherence(t @ t.T, null_coherence) >= min_relative
    remaining = np.ones(len(candidates), dtype=bool)
    clusters = []
    while remaining.sum() >= min_members:
        degree = (linked & remaining[None, :]).sum(axis=1)
        degree[~remaining] = -1
        order = np.lexsort((candidates, -degree))
        medoid = order[0]
        members = np.flatnonzero(linked[medoid] & remaining)
        if len(members) < min_members:
            break
        centrality = t[members] @ t[members].mean(axis=0)
        members = members[np.lexsort((candidates[members], -centrality))]
        clusters.append(Cluster(rows=candidates[members]))
        remaining[members] = False
    return clusters


def coherence_z(x: np.ndarray, null_rows: np.ndarray, rng: np.random.Generator,
                draws: int = 200) -> tuple[float, float]:
    """Mean pairwise cosine of the rows `x`, and how many standard deviations it lies above that of random sets of
    the same size drawn from `null_rows` (a random sample of the store)."""
    observed = mean_pairwise_cosine(x)
    m = len(x)
    if m < 2 or len(null_rows) <= m:
        return observed, float("nan")
    t = normalize_rows(null_rows)
    sets = [mean_pairwise_cosine(t[rng.choice(len(t), size=m, replace=False)]) for _ in range(draws)]
    sd = float(np.std(sets))
    return observed, (observed - float(np.mean(sets))) / max(sd, 1e-6)


def grounding(centroid: np.ndarray, generated: np.ndarray) -> float:
    """How well some images' predicted captions F(I) express the cluster's caption: the mean of the 5 largest
    cosines between the caption centroid and the generated captions of a random sample, relative to the
    sample's median on the [median, 1] scale. A visual concept (a banana) scores high, boilerplate low."""
    g = normalize_rows(generated) @ (centroid / max(np.linalg.norm(centroid), 1e-12))
    median = float(np.median(g))
    top = float(np.mean(np.sort(g)[-5:]))
    return (top - median) / max(1.0 - median, 1e-9)


def one_caption_share(captions: np.ndarray, same: float = 0.995) -> float:
    """The largest share of a cluster's captions that are one and the same caption (embeddings at cosine >= `same`).

    Boilerplate ("thumbnail", "free icon download") repeats one string over many unrelated images; a backdoor
    built from the attack's caption templates or natural target captions does not.
    """
    if len(captions) == 0:
        return float("nan")
    t = normalize_rows(captions)
    return float(((t @ t.T) >= same).sum(axis=1).max() / len(t))


def split_one_caption_groups(clusters: list[Cluster], captions_of, min_share: float, min_members: int,
                             same: float = 0.995) -> list[Cluster]:
    """Split each cluster's dominant caption string off when it makes up `min_share` of the cluster.

    A boilerplate caption ("royalty free clipart") links to genuine captions that share a word ("speaker
    clipart"); the boilerplate rows become their own cluster (a one-caption group) and the rest stays a cluster
    if it still has `min_members`. `captions_of(rows)` returns the caption embeddings of rows.
    """
    out = []
    for cluster in clusters:
        t = normalize_rows(captions_of(cluster.rows))
        same_caption = (t @ t.T) >= same
        counts = same_caption.sum(axis=1)
        top = int(np.argmax(counts))
        if counts[top] / len(t) < min_share or counts[top] == len(t):
            out.append(cluster)
            continue
        dominant = same_caption[top]
        out.append(Cluster(rows=cluster.rows[dominant]))
        if (~dominant).sum() >= min_members:
            out.append(Cluster(rows=cluster.rows[~dominant]))
    return out
