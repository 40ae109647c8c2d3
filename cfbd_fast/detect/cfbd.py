"""The cfbd verdict's rules, on arrays: the seed pool's caption clusters, which of them are set aside, the two
tests that call a cluster a backdoor, and their error rates.

A backdoor pairs one target caption (or a few paraphrases) with many images that do not show it. Among the rows
with the largest consistency c the target's captions form a tight caption cluster; so can a genuine group (a
concept the mapper finds hard, a duplicate family, boilerplate). What sets the backdoor apart is measured on every
row whose caption belongs to the cluster (its *members*, found by the correlation pass): a large share of them is
inconsistent with its image. Genuine caption groups have that share at the level of the data's other groups.
And the target caption names what the data's genuine pictures of the target show, while the poisons' images are
arbitrary: its members' images are undescribed by it far more often than the data's pairs are.

Every constant of the verdict is here, with the measurement behind it in docs/algorithm.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .fine import relative_coherence
from .seeds import mean_pairwise_cosine, normalize_rows

LINK = 0.5  # two captions are one caption cluster's when their cosine is halfway from random captions' to 1
SAME_CAPTION = 0.995  # caption embeddings this close are one caption string
SPLIT_SHARE = 0.25  # a caption string that makes up a quarter of a cluster is split off as its own group
ONE_CAPTION_SHARE = 0.5  # a cluster at least half of which is one caption string is a one-caption group
DUPLICATE_IMAGES = 0.5  # relative image coherence of a duplicate family (near-identical images)
INCONSISTENT_TAIL = 0.02  # inconsistent: c in the top 2% of all valid rows' c, or s_o in the bottom 2%
MIN_REFERENCE = 3  # clusters the set-level test compares a cluster with
GROUNDING_IMAGES = 5  # the images a one-caption group's caption matches best, whose own captions must agree with it
DESCRIBED_QUANTILE = 0.99  # a flagged pair whose caption fits its image better than 99% of the data's is genuine
UNDESCRIBED_QUANTILE = 0.5  # a pair is undescribed when its caption fits half the data's images as well as its own


@dataclass
class Cluster:
    """One caption cluster of the seed pool: its rows (most central first) and its statistics."""
    rows: np.ndarray  # store row ids, most central first
    stats: dict = field(default_factory=dict)
    seed_captions: np.ndarray | None = None  # caption embeddings of seed_rows(q), for the correlation pass

    def seed_rows(self, q: int) -> np.ndarray:
        """The cluster's fine-stage seeds: its q most central rows."""
        return self.rows[:q]


# -- the seed pool's caption clusters ---------------------------------------------------------------------------
def link_cosine(null_coherence: float) -> float:
    """The caption cosine at which two captions are linked (and a row is a cluster's member): `LINK` of the way
    from the mean cosine of random captions to identity."""
    return null_coherence + LINK * (1.0 - null_coherence)


def caption_clusters(candidates: np.ndarray, captions: np.ndarray, null_coherence: float, *,
                     min_members: int) -> list[Cluster]:
    """Split the candidate rows into caption clusters, densest first.

    Two captions are linked at `link_cosine`. The densest remaining caption (most links; ties by row id) and the
    remaining captions linked to it form a cluster; this repeats while a cluster has `min_members`.
    """
    if len(candidates) == 0:
        return []
    t = normalize_rows(captions)
    linked = relative_coherence(t @ t.T, null_coherence) >= LINK
    remaining = np.ones(len(candidates), dtype=bool)
    clusters = []
    while remaining.sum() >= min_members:
        degree = (linked & remaining[None, :]).sum(axis=1)
        degree[~remaining] = -1
        medoid = np.lexsort((candidates, -degree))[0]
        members = np.flatnonzero(linked[medoid] & remaining)
        if len(members) < min_members:
            break
        centrality = t[members] @ t[members].mean(axis=0)
        members = members[np.lexsort((candidates[members], -centrality))]
        clusters.append(Cluster(rows=candidates[members]))
        remaining[members] = False
    return clusters


def split_one_caption_groups(clusters: list[Cluster], pool_rows: np.ndarray, pool_captions: np.ndarray,
                             min_members: int) -> list[Cluster]:
    """Split each cluster's dominant caption string off when it makes up `SPLIT_SHARE` of the cluster.

    A boilerplate caption ("royalty free clipart") links to genuine captions that share a word ("speaker
    clipart"); the boilerplate rows become their own cluster and the rest stays one if it has `min_members`.
    `pool_rows` (sorted) and `pool_captions` are the seed pool's row ids and caption embeddings.
    """
    out = []
    for cluster in clusters:
        t = normalize_rows(pool_captions[np.searchsorted(pool_rows, cluster.rows)])
        same_caption = (t @ t.T) >= SAME_CAPTION
        counts = same_caption.sum(axis=1)
        top = int(np.argmax(counts))
        if counts[top] / len(t) < SPLIT_SHARE or counts[top] == len(t):
            out.append(cluster)
            continue
        dominant = same_caption[top]
        out.append(Cluster(rows=cluster.rows[dominant]))
        if (~dominant).sum() >= min_members:
            out.append(Cluster(rows=cluster.rows[~dominant]))
    return out


def distinct_captions(captions: np.ndarray) -> np.ndarray:
    """Indices of the first row of each caption string among `captions` (rows in order; one string's embeddings
    are `SAME_CAPTION` close). The fine stage correlates with a set of captions: a string repeated among the seeds
    counts once, so that a generic caption that joined the cluster a few times ("art", beside the poisons' "art of
    a banana.") does not become a seed that every row with that caption matches exactly."""
    t = normalize_rows(captions)
    keep: list[int] = []
    for i in range(len(t)):
        if not keep or float((t[keep] @ t[i]).max()) < SAME_CAPTION:
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


# -- a cluster's statistics -------------------------------------------------------------------------------------
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


def one_caption_share(captions: np.ndarray) -> float:
    """The largest share of a cluster's captions that are one and the same caption string."""
    if len(captions) == 0:
        return float("nan")
    t = normalize_rows(captions)
    return float(((t @ t.T) >= SAME_CAPTION).sum(axis=1).max() / len(t))


@dataclass
class GroundingReference:
    """A random sample's captions and images (L2-normalised) and the caption link: what `grounding` measures a
    caption against."""
    captions: np.ndarray
    images: np.ndarray
    link: float


def grounding_reference(captions: np.ndarray, images: np.ndarray, link: float) -> GroundingReference:
    """The reference of `grounding`: a random sample's captions and images, and the caption link (`link_cosine`)."""
    return GroundingReference(captions=normalize_rows(captions), images=normalize_rows(images), link=link)


def grounding(caption: np.ndarray, reference: GroundingReference) -> dict:
    """Whether a caption names something the data shows elsewhere: of the `GROUNDING_IMAGES` images of the sample
    that it matches best (by the embedding model's own image-text cosine, so no mapper is involved; the rows that
    carry the caption itself left out), how many carry a caption of their own that links to it, against how many
    a random image would (`base`: the share of the sample's other captions that link to it). A backdoor's target
    caption ("a photo of a banana.") finds the data's genuine banana pictures, and they are captioned as bananas;
    boilerplate ("Image.", "free icon download") matches arbitrary images whose captions say something else.
    `p` = P(Binomial(images, base) >= linked): small when the agreement is beyond chance."""
    t = normalize_rows(caption[None, :])[0]
    similar = reference.captions @ t
    other = similar < SAME_CAPTION
    n_images = min(GROUNDING_IMAGES, int(other.sum()))
    linked = other & (similar >= reference.link)
    base = float(linked.sum() / max(int(other.sum()), 1))
    if n_images == 0:
        return {"grounding_linked": 0, "grounding_base": base, "grounding_p": 1.0}
    match = np.where(other, reference.images @ t, -np.inf)
    best = np.argpartition(-match, n_images - 1)[:n_images]
    k = int(linked[best].sum())
    return {"grounding_linked": k, "grounding_base": base, "grounding_p": binomial_sf(k, n_images, base)}


def set_aside_reason(stats: dict, test_one_caption_groups: bool, grounding_level: float) -> str | None:
    """Why a cluster is not tested (None: it is tested). Duplicate families share near-identical images;
    one-caption groups are tested only when their caption is grounded (`grounding` p at most `grounding_level`:
    the scan's alpha over the one-caption groups)."""
    if stats["relative_image_coherence"] >= DUPLICATE_IMAGES:
        return "its images are near-identical too: a duplicate family, not a trigger"
    if stats["one_caption_share"] >= ONE_CAPTION_SHARE and not test_one_caption_groups \
            and not stats["grounding_p"] <= grounding_level:
        return (f"{stats['one_caption_share']:.0%} of it is one caption string, and {stats['grounding_linked']} of "
                f"the {GROUNDING_IMAGES} images it matches best elsewhere carry a caption that says the same (chance: "
                f"{stats['grounding_base']:.1%} each; p {stats['grounding_p']:.2g}, need {grounding_level:.2g}): it "
                "names nothing the data shows, like boilerplate (test it anyway with --test-one-caption-groups)")
    return None


# -- the set-level test -------------------------------------------------------------------------------------------
def inconsistent_rows(c: np.ndarray, s_o: np.ndarray, valid: np.ndarray, c_above: float,
                      s_o_at_most: float) -> np.ndarray:
    """Rows whose caption is not what their image shows, by either of two measurements: c in the top
    `INCONSISTENT_TAIL` of the valid rows' (through the mapper: CFBD's own signal), or s_o = max(cos(I, T), 0) in
    the bottom `INCONSISTENT_TAIL` (through the embedding model itself; ties at zero included), so that a mapper
    that explains little does not blind the test. `c_above` and `s_o_at_most` are those quantiles."""
    return valid & ((c > c_above) | (s_o <= s_o_at_most))


def binomial_sf(x: int, n: int, p: float) -> float:
    """P(X >= x) for X ~ Binomial(n, p), summed in log space (exact for any n)."""
    if x <= 0:
        return 1.0
    if x > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    k = np.arange(x, n + 1, dtype=np.float64)
    log_pmf = (math.lgamma(n + 1) - _lgamma(k + 1) - _lgamma(n - k + 1) + k * math.log(p)
               + (n - k) * math.log1p(-p))
    top = float(log_pmf.max())
    return float(min(1.0, math.exp(top) * np.exp(log_pmf - top).sum()))


def _lgamma(x: np.ndarray) -> np.ndarray:
    import torch

    return torch.lgamma(torch.from_numpy(x)).numpy()


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), by its continued fraction (Lentz's method)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _incomplete_beta(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-12:
            break
    return front * (f - 1.0)


def student_t_sf(t: float, df: int) -> float:
    """P(T >= t) for Student's t with `df` degrees of freedom."""
    if not math.isfinite(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return tail if t > 0 else 1.0 - tail


def _stable(x: np.ndarray | int, n: np.ndarray | int) -> np.ndarray:
    """A share x/n on the arcsine-square-root scale (Anscombe's form, defined at 0 and n), where its sampling
    variance is 1 / (4n + 2) whatever the share."""
    return np.arcsin(np.sqrt((np.asarray(x, dtype=np.float64) + 0.375) / (np.asarray(n, dtype=np.float64) + 0.75)))


def paule_mandel(y: np.ndarray, v: np.ndarray) -> float:
    """The between-cluster variance tau^2 of values `y` with sampling variances `v` by Paule and Mandel's
    estimator: the tau^2 at which the generalised Q statistic, sum w (y - weighted mean)^2 with w = 1 / (v + tau^2),
    equals its expectation K - 1 (0 when Q is below it at tau^2 = 0). Q falls as tau^2 grows, so bisection finds
    it. DerSimonian and Laird's moment estimator, the usual default, underestimates a large spread between few
    clusters (Veroniki et al. 2016, Research Synthesis Methods, who recommend this one)."""
    y, v = np.asarray(y, dtype=np.float64), np.asarray(v, dtype=np.float64)
    target = len(y) - 1

    def excess(tau2: float) -> float:
        w = 1.0 / (v + tau2)
        return float((w * (y - (w * y).sum() / w.sum()) ** 2).sum()) - target

    if target < 1 or excess(0.0) <= 0.0:
        return 0.0
    lo, hi = 0.0, max(float(np.var(y)), 1e-12)
    while excess(hi) > 0.0:
        lo, hi = hi, 2.0 * hi
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if excess(mid) > 0.0 else (lo, mid)
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


def _compare(k: int, reference: list[int], members: np.ndarray, inconsistent: np.ndarray, level: float) -> dict:
    """Cluster k's share of inconsistent members against the clusters `reference` (see `inconsistency_test`)."""
    share = inconsistent / np.maximum(members, 1)
    ref_share = max(INCONSISTENT_TAIL, float(np.median(share[reference])))
    n, x = int(members[k]), int(inconsistent[k])
    p_chance = binomial_sf(x, n, ref_share)
    # Random effects on the stable scale: each reference cluster's value is its true value (spread tau^2 between
    # genuine clusters, Paule-Mandel) plus its sampling noise; cluster k is a new draw from that spread. As for
    # the chance p-value, a genuine cluster is taken to be at least as inconsistent as random rows: a large cluster
    # far more consistent than that (a family of near-identical emoji) would otherwise widen the spread upwards.
    floor = np.maximum(inconsistent[reference], INCONSISTENT_TAIL * members[reference])
    y, v = _stable(floor, members[reference]), 1.0 / (4.0 * members[reference] + 2.0)
    tau2 = paule_mandel(y, v)
    w_re = 1.0 / (v + tau2)
    mean = float((w_re * y).sum() / w_re.sum())
    scale = math.sqrt(tau2 + 1.0 / (4.0 * n + 2.0) + 1.0 / float(w_re.sum()))
    t = (float(_stable(x, n)) - mean) / scale
    p_spread = student_t_sf(t, len(reference) - 1)
    p = max(p_chance, p_spread) if n else 1.0
    return {"members": n, "inconsistent": x, "inconsistent_share": float(share[k]), "reference_share": ref_share,
            "reference_clusters": len(reference), "clusters_spread": math.sqrt(tau2), "spread_t": float(t),
            "p_chance": p_chance, "p_spread": p_spread, "p_value": p, "level": level, "backdoor": False}


def inconsistency_test(members: np.ndarray, inconsistent: np.ndarray, alpha: float,
                       significant_rows: np.ndarray | None = None, min_rows: int = 10,
                       base_share: float = INCONSISTENT_TAIL, undescribed: np.ndarray | None = None,
                       undescribed_base: float | None = None,
                       grounding_p: np.ndarray | None = None) -> list[dict]:
    """Which clusters are backdoors, by two tests:
    - grounded and undescribed (`grounded_undescribed`, with `undescribed` and `grounding_p` given): the cluster's
      caption names something the data shows elsewhere (grounding p at most alpha / K, K clusters tested), yet its
      own rows' images are not what it names more often than the data's pairs are (at alpha / G, G the clusters
      found grounded: the grounding is measured on other rows than the count, so it filters the family without
      biasing the count, as in independent filtering, Bourgon et al. 2010, PNAS). It needs no other cluster,
      and the clusters it calls are set apart first;
    - the set-level test of the others against each other, at alpha / K (`set_level_test`).
    """
    members = np.asarray(members, dtype=np.int64)
    k_tested = len(members)
    level = alpha / max(k_tested, 1)
    first: list[dict | None] = [None] * k_tested
    if undescribed is not None:
        if undescribed_base is None or grounding_p is None:
            raise ValueError("the grounded-and-undescribed test needs undescribed_base and grounding_p")
        grounded = int(np.sum(np.asarray(grounding_p) <= level))
        first = [grounded_undescribed(int(members[k]), int(undescribed[k]), undescribed_base, float(grounding_p[k]),
                                      level, alpha / max(grounded, 1)) for k in range(k_tested)]
    rest = np.array([k for k in range(k_tested) if not (first[k] and first[k]["grounded_undescribed"])],
                    dtype=np.int64)
    inconsistent = np.asarray(inconsistent, dtype=np.int64)
    sig = None if significant_rows is None else np.asarray(significant_rows)[rest]
    by_rest = dict(zip(rest.tolist(), set_level_test(members[rest], inconsistent[rest], level, sig, min_rows,
                                                     base_share)))
    genuine = [k for k in rest.tolist() if not by_rest[k]["backdoor"]]
    out = []
    for k in range(k_tested):
        if k in by_rest:
            test = by_rest[k]
        else:  # called first: its statistics against the genuine clusters, for the record
            test = _compare(k, genuine, members, inconsistent, level) if len(genuine) >= MIN_REFERENCE else \
                _against_rows(int(members[k]), int(inconsistent[k]), base_share, level, k_tested - 1)
            test["significant_rows"] = None if significant_rows is None else int(significant_rows[k])
        if first[k] is not None:
            test = {**test, **first[k]}
            if first[k]["grounded_undescribed"]:
                test.update(backdoor=True, p_value=first[k]["p_undescribed"], level=first[k]["undescribed_level"])
        out.append(test)
    return out


def grounded_undescribed(members: int, undescribed: int, base: float, grounding_p: float, grounding_level: float,
                         level: float) -> dict:
    """A backdoor's caption is grounded (`grounding`: it names what the data's genuine pictures of the target
    show, and they are captioned so), while the images of its poisons are arbitrary: each poison is undescribed
    (`undescribed`: its caption fits at least half of the data's images as well as its own image) with probability
    about 1/2, whatever the domain, tower or dataset size. The data's pairs are undescribed at `base` (its own
    rows measured the same way). Called when the grounding p-value is at most `grounding_level` and
    P(Binomial(members, base) >= undescribed) at most `level`. A genuine cluster's members are described as often
    as the data's pairs are; boilerplate is not grounded."""
    p_undescribed = binomial_sf(undescribed, members, base) if members else 1.0
    grounded = grounding_p <= grounding_level
    return {"undescribed": undescribed, "undescribed_share": undescribed / max(members, 1),
            "undescribed_base": base, "p_undescribed": p_undescribed, "grounding_p": grounding_p,
            "grounded": grounded, "undescribed_level": level,
            "grounded_undescribed": grounded and p_undescribed <= level}


def _against_rows(members: int, inconsistent: int, base_share: float, level: float, others: int) -> dict:
    """A cluster's count of inconsistent members against the data's rows (no reference clusters)."""
    ref_share = max(INCONSISTENT_TAIL, float(base_share))
    p_chance = binomial_sf(inconsistent, members, ref_share) if members else 1.0
    return {"members": members, "inconsistent": inconsistent, "inconsistent_share": inconsistent / max(members, 1),
            "reference_share": ref_share, "reference_clusters": others, "clusters_spread": float("nan"),
            "spread_t": float("nan"), "p_chance": p_chance, "p_spread": float("nan"), "p_value": p_chance,
            "level": level, "backdoor": False}


def set_level_test(members: np.ndarray, inconsistent: np.ndarray, level: float,
                   significant_rows: np.ndarray | None = None, min_rows: int = 10,
                   base_share: float = INCONSISTENT_TAIL) -> list[dict]:
    """Which clusters are backdoors: those whose members are inconsistent with their images far more often than
    the members of the data's other caption clusters are.

    `members[k]`: how many valid rows belong to cluster k (their caption's correlation with its seeds reaches
    `link_cosine`); `inconsistent[k]`: how many of them are `inconsistent_rows`. A
    cluster is compared with reference clusters by two one-sided p-values, both of which must be at most
    `level` (alpha / K, K clusters tested):
    - chance: its count against Binomial(members, reference share), the reference share being the median of the
      reference clusters' shares and at least `INCONSISTENT_TAIL` (the share of a caption unrelated to c);
    - spread: its share as a new draw from the reference clusters' shares (a random-effects prediction on the
      arcsine-square-root scale: their spread between clusters, `paule_mandel`, beside each one's sampling
      noise; Student's t with K-1 degrees of freedom), so that genuine clusters, which differ in how hard their
      concept is for the mapper, are not called backdoors however many rows they have.
    The clusters were formed from the rows with the largest c, so their members are inconsistent more often than
    random rows by selection; the other clusters, formed the same way, are the reference that accounts for it.
    Two targets must not hide each other, so the test is sequential (a generalized ESD outlier test): the most
    extreme cluster (the smallest p-value against the rest) is set apart, and the most extreme of what remains
    next, at most K / 2 times; the clusters called are those up to the last step that is significant. Extreme by
    p-value, not by share: a small genuine cluster with a high share but little evidence would otherwise come
    early and be called whenever a later step is significant. The chance that any genuine
    cluster is called is about alpha, as far as the other clusters stand for genuine ones, and neither p-value
    needs more rows for the same effect as the dataset grows. With fewer than `MIN_REFERENCE` other clusters
    there is no reference: a cluster is a backdoor when its members are inconsistent more often than the data's
    rows are (`base_share`, the share of all valid rows that are `inconsistent_rows`; the chance p-value at most
    `level`) and the row-level family-wise rule holds (at least `min_rows` of the cluster's rows significant at
    alpha after Bonferroni over every row and cluster, `significant_rows[k]`; its power falls as the dataset
    grows). A genuine caption cluster whose rows are as consistent as the data's is not called, however many of
    its rows lie far from the bulk of the score.
    """
    members = np.asarray(members, dtype=np.int64)
    inconsistent = np.asarray(inconsistent, dtype=np.int64)
    k_tested = len(members)
    if k_tested - 1 < MIN_REFERENCE:
        out = []
        for k in range(k_tested):
            rows = None if significant_rows is None else int(significant_rows[k])
            test = _against_rows(int(members[k]), int(inconsistent[k]), base_share, level, k_tested - 1)
            out.append({**test, "significant_rows": rows,
                        "backdoor": rows is not None and rows >= min_rows and test["p_chance"] <= level})
        return out
    remaining, steps = list(range(k_tested)), []
    while len(remaining) - 1 >= MIN_REFERENCE and len(steps) < max(1, k_tested // 2):
        candidates = [_compare(i, [r for r in remaining if r != i], members, inconsistent, level) | {"cluster": i}
                      for i in remaining]
        step = min(candidates, key=lambda c: (c["p_value"], -c["inconsistent_share"], c["cluster"]))
        steps.append(step)
        remaining.remove(step["cluster"])
    called = max([r + 1 for r, step in enumerate(steps) if step["p_value"] <= level], default=0)
    results = {step["cluster"]: {**step, "backdoor": r < called} for r, step in enumerate(steps)}
    genuine = [k for k in range(k_tested) if not (k in results and results[k]["backdoor"])]
    out = []
    for k in range(k_tested):
        result = results.get(k) or _compare(k, [i for i in genuine if i != k], members, inconsistent, level)
        result.pop("cluster", None)
        out.append({**result, "significant_rows": None if significant_rows is None else int(significant_rows[k])})
    return out


def verdict_reason(test: dict) -> str:
    """One sentence for a cluster's verdict."""
    share, ref = test["inconsistent_share"], test["reference_share"]
    if test.get("grounded_undescribed"):
        return (f"its caption names what the data's pictures show elsewhere (grounding p {test['grounding_p']:.1e}), "
                f"yet {test['undescribed']} of its {test['members']} rows ({test['undescribed_share']:.0%}) have an "
                f"image it does not describe, against {test['undescribed_base']:.0%} of the data's pairs (p "
                f"{test['p_undescribed']:.1e})")
    if not math.isfinite(test["clusters_spread"]):
        return (f"{share:.0%} of its {test['members']} rows are inconsistent with their images, against {ref:.0%} "
                f"of all rows (p {test['p_value']:.2g}, need {test['level']:.2g}); fewer than {MIN_REFERENCE} other "
                f"caption clusters to compare it with, so the row-level rule decides too: "
                f"{test['significant_rows']} rows significant after Bonferroni over every row "
                f"({'a backdoor' if test['backdoor'] else 'not a backdoor'})")
    if test["backdoor"]:
        return (f"{test['inconsistent']} of its {test['members']} rows ({share:.0%}) are inconsistent with their "
                f"images, against {ref:.0%} for the data's caption clusters (p {test['p_value']:.1e})")
    return (f"{share:.0%} of its {test['members']} rows are inconsistent with their images, against {ref:.0%} for "
            f"the data's caption clusters: not beyond chance and their spread (p {test['p_value']:.2g}, need "
            f"{test['level']:.2g})")


# -- rows ---------------------------------------------------------------------------------------------------------
def described(images: np.ndarray, texts: np.ndarray, reference_images: np.ndarray,
              quantile: float = DESCRIBED_QUANTILE, chunk: int = 4096) -> np.ndarray:
    """Which pairs' captions describe their own images: cos(I, T) above the `quantile` of cos(I', T) over the
    random images I' of `reference_images`, the same caption against the data's images. A poison's image is
    unrelated to its caption (a trigger on an image of anything), so its cosine is one more draw from that
    distribution and it passes with probability 1 - quantile, whatever the domain, tower or dataset size; a
    genuine pair of the target's concept (a banana captioned as one) passes when the embedding model can see it."""
    return _above_caption_null(images, texts, reference_images, quantile, chunk)


def undescribed(images: np.ndarray, texts: np.ndarray, reference_images: np.ndarray,
                quantile: float = UNDESCRIBED_QUANTILE, chunk: int = 4096) -> np.ndarray:
    """Which pairs' captions fit their own image no better than they fit the data's images at the `quantile`
    (cos(I, T) at most that quantile of cos(I', T) over `reference_images`; at 0.5, half the data's images fit
    the caption as well). A poison is undescribed with probability `quantile` (see `described`); a genuine pair
    rarely, as far as the embedding model can see its concept."""
    return ~_above_caption_null(images, texts, reference_images, quantile, chunk)


def _above_caption_null(images: np.ndarray, texts: np.ndarray, reference_images: np.ndarray, quantile: float,
                        chunk: int) -> np.ndarray:
    """cos(I, T) > the `quantile` of cos(I', T) over `reference_images`, row by row."""
    reference = normalize_rows(reference_images)
    out = np.zeros(len(images), dtype=bool)
    for start in range(0, len(images), chunk):
        i, t = normalize_rows(images[start:start + chunk]), normalize_rows(texts[start:start + chunk])
        null = t @ reference.T
        out[start:start + len(i)] = np.sum(i * t, axis=1) > np.quantile(null, quantile, axis=1)
    return out
