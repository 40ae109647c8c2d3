"""Detection stages on small hand-checked inputs: seeds, cluster pruning, scores, thresholds, baselines, metrics."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from cfbd_fast.detect import baselines, cfbd as clusters, coarse, fine, metrics, seeds, threshold
from cfbd_fast.pipeline.paper import CLASSIC_ESTIMATORS


# -- seeds ------------------------------------------------------------------------------------------------
def test_top_rows_orders_by_c_then_row_id():
    c = np.array([0.1, 0.9, 0.5, 0.9, np.nan, 0.7, 0.5], dtype=np.float32)
    valid = ~np.isnan(c)
    assert seeds.top_rows(c, valid, 3).tolist() == [1, 3, 5]
    # the tie at 0.5 between rows 2 and 6 goes to the lower row id
    assert seeds.top_rows(c, valid, 4).tolist() == [1, 3, 5, 2]
    assert seeds.top_rows(c, valid, 100).tolist() == [1, 3, 5, 2, 6, 0]


def test_top_rows_skips_invalid_even_when_largest():
    c = np.array([5.0, 1.0, 2.0], dtype=np.float32)
    valid = np.array([False, True, True])
    assert seeds.top_rows(c, valid, 1).tolist() == [2]


def test_dense_rows_prefers_the_shared_caption():
    rng = np.random.default_rng(0)
    d = 32
    target = rng.normal(size=d)
    captions = rng.normal(size=(40, d))  # 40 unrelated captions
    captions[[3, 7, 11, 30, 35]] = target + 0.05 * rng.normal(size=(5, d))  # five share a target
    cand = np.arange(40) + 100
    picked = seeds.dense_rows(cand, captions, q=5, neighbours=3)
    assert sorted(picked.tolist()) == [103, 107, 111, 130, 135]


def test_mean_pairwise_cosine_matches_literal():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(17, 9))
    t = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = t @ t.T
    literal = (sim.sum() - np.trace(sim)) / (17 * 16)
    assert seeds.mean_pairwise_cosine(x) == pytest.approx(literal, abs=1e-6)


def test_caption_clusters_finds_each_shared_caption_densest_first():
    rng = np.random.default_rng(2)
    d = 64
    banana, pizza = rng.normal(size=d), rng.normal(size=d)
    caps = np.vstack([banana + 0.1 * rng.normal(size=(12, d)), rng.normal(size=(30, d)),
                      pizza + 0.1 * rng.normal(size=(7, d)), rng.normal(size=(3, 64))])
    rows = np.arange(len(caps)) + 1000
    found = clusters.caption_clusters(rows, caps, null_coherence=0.0, min_members=5)
    assert [sorted(c.rows.tolist()) for c in found] == [list(range(1000, 1012)), list(range(1042, 1049))]


def test_caption_clusters_on_random_captions_finds_none():
    rng = np.random.default_rng(3)
    caps = rng.normal(size=(200, 128))
    assert clusters.caption_clusters(np.arange(200), caps, null_coherence=0.0, min_members=5) == []


def test_coherence_z_sees_a_shared_direction():
    rng = np.random.default_rng(5)
    null = rng.normal(size=(2000, 32))
    shared = rng.normal(size=(20, 32)) + 1.5 * rng.normal(size=32)
    _, z_shared = clusters.coherence_z(shared, null, rng)
    _, z_random = clusters.coherence_z(rng.normal(size=(20, 32)), null, rng)
    assert z_shared > 10 and abs(z_random) < 4


# -- coarse stage ---------------------------------------------------------------------------------------
def test_coarse_split_low_mode_is_benign_and_outliers_are_not():
    rng = np.random.default_rng(4)
    c = np.concatenate([rng.normal(0.05, 0.01, 5000), rng.normal(0.4, 0.02, 50)]).astype(np.float32)
    c[7] = np.nan
    valid = ~np.isnan(c)
    split = coarse.coarse_split(c, valid, k=2, gamma=0.9)
    assert np.isnan(split.posterior[7]) and not split.benign[7]
    assert split.benign[:5000][valid[:5000]].mean() > 0.99
    assert not split.benign[5000:].any()
    assert split.gmm_summary()["lowest_component"] == int(np.argmin(split.gmm.means))


# -- fine-stage score ------------------------------------------------------------------------------------
def test_fine_score_z_minus_so():
    z = np.array([0.9, 0.9, 0.2], dtype=np.float32)
    s_o = np.array([0.1, 0.4, 0.3], dtype=np.float32)
    np.testing.assert_allclose(fine.fine_score(z, s_o, "z-so"), [0.8, 0.5, -0.1], atol=1e-7)
    np.testing.assert_array_equal(fine.fine_score(z, s_o, "z"), z)


# -- thresholds -------------------------------------------------------------------------------------------
def test_null_quantile_controls_fpr_on_reference():
    rng = np.random.default_rng(5)
    score = rng.normal(size=100_000)
    ref = np.ones(len(score), dtype=bool)
    t = threshold.null_quantile(score, ref, 0.01)
    assert np.mean(score > t) <= 0.01
    assert np.mean(score > t) > 0.009


def test_robust_z_on_gaussian_null():
    rng = np.random.default_rng(6)
    score = rng.normal(3.0, 2.0, size=200_000)
    t = threshold.robust_z(score, 0.001)
    assert t == pytest.approx(3.0 + 3.0902 * 2.0, rel=0.02)


def test_largest_gap_between_bulk_and_cluster():
    score = np.concatenate([np.linspace(0.0, 0.3, 1000), np.linspace(0.8, 0.9, 20)])
    t = threshold.largest_gap(score, max_fraction=0.05)
    assert t == pytest.approx(0.55, abs=1e-9)


def test_mixture_threshold_separates_two_modes():
    rng = np.random.default_rng(7)
    score = np.concatenate([rng.normal(0.0, 0.05, 20_000), rng.normal(1.0, 0.05, 500)])
    t = threshold.mixture(score)
    assert 0.15 < t < 0.85


def test_every_declared_estimator_is_implemented():
    rng = np.random.default_rng(8)
    score = np.concatenate([rng.normal(0.0, 0.05, 5000), rng.normal(1.0, 0.05, 50)])
    estimates = {m: threshold.estimate(score, m, reference=score < 0.5, fpr=0.001) for m in CLASSIC_ESTIMATORS}
    assert set(estimates) == {"gap", "robust-z", "null-quantile", "mixture"}
    assert all(0.1 < t < 0.95 for t in estimates.values()), estimates


# -- baselines ----------------------------------------------------------------------------------------------
def test_safeclip_flags_the_low_cosine_mode():
    rng = np.random.default_rng(8)
    s_o = np.concatenate([rng.normal(0.3, 0.03, 10_000), rng.normal(0.05, 0.02, 300)]).astype(np.float32)
    valid = np.ones(len(s_o), dtype=bool)
    score, info = baselines.safeclip_score(s_o, valid)
    flagged = score > 0.1
    assert flagged[10_000:].mean() > 0.95 and flagged[:10_000].mean() < 0.02
    assert info["means"][info["safe_component"]] == pytest.approx(0.3, abs=0.01)


def test_cosine_score():
    np.testing.assert_allclose(baselines.cosine_score(np.array([0.0, 0.25, 1.0])), [1.0, 0.75, 0.0])


# -- metrics ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranking_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(3000) < 0.05
    score = np.round(rng.normal(size=3000) + 1.5 * labels, 1)  # rounding creates many ties
    assert metrics.auroc(labels, score) == pytest.approx(roc_auc_score(labels, score), abs=1e-12)
    assert metrics.auprc(labels, score) == pytest.approx(average_precision_score(labels, score), abs=1e-12)


def test_null_pvalues_match_scipy_far_into_the_tail():
    from scipy.special import ndtr

    rng = np.random.default_rng(0)
    score = np.r_[rng.normal(size=5000), np.linspace(-30, 30, 601), np.nan]
    p, null = threshold.null_pvalues(score, np.ones(len(score), dtype=bool))
    want = np.r_[ndtr(-(score[:-1] - null["location"]) / null["scale"]), 1.0]
    np.testing.assert_allclose(p, want, rtol=1e-9, atol=1e-300)


def test_tpr_at_fpr_hand_checked():
    labels = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1], dtype=bool)
    score = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 8.5, 9.5, 3, 10], dtype=float)
    # FPR <= 0.1 allows one negative (score 9) above the threshold: t = 8, positives above: 8.5, 9.5, 10
    assert metrics.tpr_at_fpr(labels, score, 0.1) == pytest.approx(0.75)
    # FPR 0: t = 9, positives above: 9.5, 10
    assert metrics.tpr_at_fpr(labels, score, 0.0) == pytest.approx(0.5)


def test_detection_metrics_counts():
    labels = np.array([1, 1, 0, 0, 0], dtype=bool)
    flagged = np.array([1, 0, 1, 0, 0], dtype=bool)
    m = metrics.detection_metrics(labels, flagged, np.array([0.9, 0.1, 0.8, 0.2, np.nan]))
    assert (m["tpr"], m["fpr"], m["precision"]) == (0.5, pytest.approx(1 / 3), 0.5)
    assert m["true_positives"] == 1 and m["false_positives"] == 1




# -- error-controlled verdicts --------------------------------------------------------------------------------
def test_benjamini_hochberg_matches_scipy():
    from scipy.stats import false_discovery_control

    rng = np.random.default_rng(9)
    p = np.concatenate([rng.uniform(size=5000), rng.uniform(0, 1e-6, size=40)])
    for fdr in (0.01, 0.05, 0.2):
        reject, cut = threshold.benjamini_hochberg(p, fdr)
        np.testing.assert_array_equal(reject, false_discovery_control(p, method="bh") <= fdr)
        assert reject.sum() >= 40 and np.all(p[reject] <= cut)


def test_null_pvalues_are_uniform_on_the_null_and_tiny_for_outliers():
    rng = np.random.default_rng(10)
    score = np.concatenate([rng.normal(0.2, 0.05, 100_000), np.full(30, 0.8)])
    p, null = threshold.null_pvalues(score, np.ones(len(score), dtype=bool))
    assert null["location"] == pytest.approx(0.2, abs=0.002) and null["scale"] == pytest.approx(0.05, rel=0.03)
    bulk = p[:100_000]
    for q in (0.01, 0.1, 0.5):  # P(p <= q) = q under the null
        assert np.mean(bulk <= q) == pytest.approx(q, rel=0.1)
    reject, _ = threshold.benjamini_hochberg(p, 0.05)
    assert reject[100_000:].all() and reject[:100_000].sum() <= 5
    fw, _ = threshold.family_wise(p, 0.05)
    assert fw[100_000:].all() and fw[:100_000].sum() == 0
