"""The cfbd verdict's rules (detect/cfbd.py): the set-level cluster test's error rate under a null, its power at
every dataset size, its distributions against scipy, and grounding on boilerplate."""
import numpy as np
import pytest
from scipy import optimize, stats

from cfbd_fast.detect import cfbd


def _any_call(members, inconsistent, alpha=0.05) -> bool:
    return any(t["backdoor"] for t in cfbd.inconsistency_test(members, inconsistent, alpha))


@pytest.mark.parametrize("sizes", [(20, 200), (200, 5000), (20_000, 200_000)], ids=["small", "mid", "large"])
def test_clusters_of_random_rows_are_called_backdoors_at_most_alpha_of_the_time(sizes):
    """Clusters whose members are random rows: each member is inconsistent with the tail's probability. The
    chance of any backdoor call among 8 clusters must stay at most alpha (here 0.05, with the simulation's error)."""
    rng = np.random.default_rng(0)
    reps, calls = 400, 0
    for _ in range(reps):
        members = rng.integers(*sizes, size=8)
        calls += _any_call(members, rng.binomial(members, cfbd.INCONSISTENT_TAIL))
    assert calls / reps <= 0.05 + 2.5 * np.sqrt(0.05 * 0.95 / reps), calls / reps


def test_genuine_clusters_that_differ_mildly_are_not_called_at_any_size():
    """Genuine clusters differ in how hard their concept is (their shares vary by 30% around 5%); a large dataset
    must not turn that spread into backdoor calls: the rate stays about twice alpha (measured 0.11 here with 10,000
    to 100,000 members a cluster, 0.115 in 1,000 draws; bounded here with the simulation's error; it was 0.4 when
    the spread was ignored)."""
    rng = np.random.default_rng(1)
    reps, calls = 300, 0
    for _ in range(reps):
        members = rng.integers(10_000, 100_000, size=8)
        share = rng.gamma(shape=1 / 0.3 ** 2, scale=0.05 * 0.3 ** 2, size=8)
        calls += _any_call(members, rng.binomial(members, np.clip(share, 0, 1)))
    assert calls / reps <= 2 * 0.05 + 2 * np.sqrt(0.1 * 0.9 / reps), calls / reps


@pytest.mark.parametrize("members", [30, 300, 30_000])
def test_a_backdoor_cluster_is_found_at_every_size(members):
    """A cluster a third of whose members are inconsistent, among 7 genuine ones (as inconsistent as random rows):
    found at 30 members as at 30,000 (the test's power does not fall as the dataset grows)."""
    rng = np.random.default_rng(2)
    found = 0
    for _ in range(50):
        n = np.concatenate([[members], rng.integers(50, 2000, size=7)])
        x = rng.binomial(n, np.concatenate([[0.33], np.full(7, cfbd.INCONSISTENT_TAIL)]))
        tests = cfbd.inconsistency_test(n, x, 0.05)
        found += tests[0]["backdoor"] and not any(t["backdoor"] for t in tests[1:])
    assert found >= 45, found


def test_two_targets_do_not_hide_each_other():
    rng = np.random.default_rng(3)
    found = 0
    for _ in range(50):
        n = np.concatenate([[40, 30], rng.integers(50, 2000, size=6)])
        x = rng.binomial(n, np.concatenate([[0.45, 0.45], np.full(6, 0.05)]))
        tests = cfbd.inconsistency_test(n, x, 0.05)
        found += tests[0]["backdoor"] and tests[1]["backdoor"] and not any(t["backdoor"] for t in tests[2:])
    assert found >= 40, found


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paule_mandel_solves_its_estimating_equation(seed):
    """tau^2 is the root of Q(tau^2) = K - 1 (scipy's brentq on the same equation), or 0 when Q(0) is below it."""
    rng = np.random.default_rng(seed)
    n = rng.integers(30, 3000, size=10)
    y, v = cfbd._stable(rng.binomial(n, rng.uniform(0.02, 0.2, size=10)), n), 1.0 / (4.0 * n + 2.0)

    def excess(tau2):
        w = 1.0 / (v + tau2)
        return float((w * (y - (w * y).sum() / w.sum()) ** 2).sum()) - (len(y) - 1)

    want = 0.0 if excess(0.0) <= 0 else optimize.brentq(excess, 0.0, 10.0)
    assert cfbd.paule_mandel(y, v) == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert cfbd.paule_mandel(np.full(5, 0.3), np.full(5, 0.01)) == 0.0  # identical values: no spread


def test_a_genuine_cluster_the_tower_cannot_match_is_not_called_beside_large_consistent_ones():
    """The counts measured on the clean copy of Twemoji at 10,000 pairs with the weak tower (trained mapper, every
    cluster tested): an "X clipart" cluster whose captions name 67 different objects, 14 of them inconsistent
    (mostly s_o = 0), beside large, consistent emoji families. A DerSimonian-Laird spread, set by the large
    clusters, called it; the Paule-Mandel spread does not."""
    members = np.array([67, 73, 30, 215, 34, 698, 547, 2466, 500, 1165, 103, 430])
    inconsistent = np.array([14, 9, 3, 15, 4, 26, 12, 77, 14, 30, 8, 7])
    assert not any(t["backdoor"] for t in cfbd.inconsistency_test(members, inconsistent, 0.05))
    with_target = cfbd.inconsistency_test(np.r_[members, 132], np.r_[inconsistent, 60], 0.05)  # a 1% banana
    assert [t["backdoor"] for t in with_target] == [False] * len(members) + [True]


def test_the_test_reports_its_inputs_and_level():
    tests = cfbd.inconsistency_test([100, 80, 120, 90], [40, 4, 6, 3], alpha=0.05)
    assert [t["backdoor"] for t in tests] == [True, False, False, False]
    assert tests[0]["members"] == 100 and tests[0]["inconsistent"] == 40 and tests[0]["level"] == 0.05 / 4
    assert tests[0]["p_value"] == max(tests[0]["p_chance"], tests[0]["p_spread"])


@pytest.mark.parametrize("x,n,p", [(10, 27, 0.05), (4, 22, 0.05), (54, 131, 0.05), (1, 5, 0.1), (300, 100_000, 0.002),
                                   (0, 10, 0.3), (11, 10, 0.3)])
def test_binomial_tail_equals_scipy(x, n, p):
    assert cfbd.binomial_sf(x, n, p) == pytest.approx(stats.binom.sf(x - 1, n, p), rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("t,df", [(2.0, 6), (3.7, 6), (-1.0, 3), (10.0, 2), (0.5, 30), (0.0, 5), (40.0, 7)])
def test_student_t_tail_equals_scipy(t, df):
    assert cfbd.student_t_sf(t, df) == pytest.approx(stats.t.sf(t, df), rel=1e-9, abs=1e-300)


def test_grounding_tells_a_target_caption_from_boilerplate():
    """A sample of 300 concepts with a few pictures each, captioned by their concept. A caption naming one of
    them matches that concept's pictures best, and their captions agree with it (grounded); a caption that is none
    of them (boilerplate) matches arbitrary pictures whose captions say something else."""
    rng = np.random.default_rng(4)
    concepts = rng.normal(size=(300, 64))
    which = rng.integers(0, 300, size=3000)
    captions = concepts[which] + 0.6 * rng.normal(size=(3000, 64))
    images = concepts[which] + 0.6 * rng.normal(size=(3000, 64))
    reference = cfbd.grounding_reference(captions, images, cfbd.link_cosine(0.0))
    target = cfbd.grounding(concepts[7], reference)
    boilerplate = cfbd.grounding(rng.normal(size=64), reference)
    assert target["grounding_linked"] >= 3 and target["grounding_p"] <= 1e-3, target
    assert boilerplate["grounding_linked"] == 0 and boilerplate["grounding_p"] == 1.0, boilerplate


def test_grounding_leaves_out_the_rows_that_carry_the_caption():
    """A one-caption group's own rows (its caption on unrelated pictures) are not evidence for it: a caption that
    only those rows carry is not grounded, however many they are."""
    rng = np.random.default_rng(6)
    images = rng.normal(size=(500, 32))
    captions = rng.normal(size=(500, 32))
    boiler = rng.normal(size=32)
    captions[:60] = boiler
    images[:60] = boiler + 0.1 * rng.normal(size=(60, 32))  # even pictures that match it
    result = cfbd.grounding(boiler, cfbd.grounding_reference(captions, images, cfbd.link_cosine(0.0)))
    assert result["grounding_linked"] == 0 and result["grounding_p"] == 1.0, result


def test_split_one_caption_groups_takes_arrays():
    rng = np.random.default_rng(5)
    boiler = rng.normal(size=32)
    pool_rows = np.arange(100, 130)
    pool_captions = np.vstack([np.tile(boiler, (12, 1)), boiler + 0.8 * rng.normal(size=(18, 32))])
    out = cfbd.split_one_caption_groups([cfbd.Cluster(rows=pool_rows)], pool_rows, pool_captions, min_members=10)
    assert [len(c.rows) for c in out] == [12, 18] and set(out[0].rows) == set(range(100, 112))


def test_without_a_reference_a_cluster_as_consistent_as_the_data_is_not_called():
    """Fewer than MIN_REFERENCE other clusters (one caption cluster in the seed pool, as at 100,000 pairs): rows far
    from the bulk of the score are not enough; the cluster's rows must also be inconsistent more often than the
    data's are."""
    genuine, backdoor = cfbd.inconsistency_test(np.array([1186, 632]), np.array([35, 126]), 0.05,
                                                significant_rows=np.array([51, 297]), base_share=0.03)
    assert not genuine["backdoor"] and genuine["p_value"] > 0.5, genuine
    assert backdoor["backdoor"] and backdoor["p_value"] < 1e-20, backdoor
    assert np.isnan(backdoor["clusters_spread"])


@pytest.mark.parametrize("rule, quantile, poison_rate", [("described", 0.99, 0.01), ("undescribed", 0.5, 0.5)])
def test_a_poison_is_described_and_undescribed_at_the_stated_rates(rule, quantile, poison_rate):
    """`described` keeps a flagged pair whose caption fits its own image better than 99% of the data's images: a
    pair whose image is unrelated to its caption (a poison) passes 1 time in 100; `undescribed` (its caption fits
    its image no better than the median of the data's images) holds for a poison 1 time in 2. A pair whose image
    carries its caption's concept is described nearly always and undescribed almost never."""
    rng = np.random.default_rng(0)
    dim, n = 64, 20_000
    reference = rng.standard_normal((2000, dim))
    texts = rng.standard_normal((n, dim))
    unrelated = rng.standard_normal((n, dim))
    test = getattr(cfbd, rule)
    rate = test(unrelated, texts, reference).mean()
    # the quantile's own sampling error beside the binomial's
    assert abs(rate - poison_rate) < 4 * np.sqrt(poison_rate * (1 - poison_rate) / n) + 0.01 * poison_rate + 0.004, rate
    genuine = texts + 0.5 * rng.standard_normal((n, dim))  # an image embedding near its caption's
    assert test(genuine, texts, reference).mean() == pytest.approx(float(rule == "described"), abs=0.01)
    # against a float64 computation, in chunks smaller than the rows
    mixed = np.where(rng.random((n, 1)) < 0.5, genuine, unrelated)[:500]
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    above = np.sum(unit(mixed) * unit(texts[:500]), axis=1) > np.quantile(unit(texts[:500]) @ unit(reference).T,
                                                                          quantile, axis=1)
    want = above if rule == "described" else ~above
    assert 100 < want.sum() < 400
    assert (test(mixed, texts[:500], reference, chunk=64) == want).all()
    assert test(np.zeros((0, dim)), np.zeros((0, dim)), reference).shape == (0,)  # a rank without such rows


@pytest.mark.parametrize("size", [30, 300, 3000])
def test_grounded_genuine_clusters_are_called_undescribed_at_most_at_the_level(size):
    """Under the null of the grounded-and-undescribed test (a cluster's members undescribed at the data's rate, its
    caption grounded), a cluster is called at most `level` of the time, at any size; half-undescribed members (a
    backdoor's poisons beside its genuine pairs) are called at 1% of the data or more."""
    rng = np.random.default_rng(size)
    level, base = 0.01, 0.2
    calls = [cfbd.grounded_undescribed(size, int(rng.binomial(size, base)), base, 0.0, level, level)
             ["grounded_undescribed"] for _ in range(4000)]
    assert np.mean(calls) <= level + 3 * np.sqrt(level / 4000)
    poisons = size * 2 // 3  # two thirds poisons, half of them undescribed; the rest genuine, at the base rate
    hit = cfbd.grounded_undescribed(size, poisons // 2 + int(base * (size - poisons)), base, 0.0, level, level)
    assert hit["grounded_undescribed"]
    boilerplate = cfbd.grounded_undescribed(size, size, base, 0.5, level, level)  # names nothing: not grounded
    assert not boilerplate["grounded"] and not boilerplate["grounded_undescribed"]


def test_families_of_genuine_clusters_are_called_undescribed_at_most_alpha_of_the_time():
    """Family-wise over the clusters: 8 genuine clusters, half of whose captions name a concept the data shows
    (grounded) and half not (grounding p uniform), members undescribed at the data's rate. A call of any of them
    by the grounded-and-undescribed test happens at most alpha of the time, the count being tested at alpha over
    the clusters found grounded."""
    rng = np.random.default_rng(3)
    alpha, base, k = 0.05, 0.2, 8
    calls = 0
    for _ in range(2000):
        members = rng.integers(20, 2000, size=k)
        grounding_p = np.r_[np.zeros(k // 2), rng.random(k - k // 2)]
        tests = cfbd.inconsistency_test(members, rng.binomial(members, 0.02), alpha,
                                        undescribed=rng.binomial(members, base), undescribed_base=base,
                                        grounding_p=grounding_p)
        calls += any(t["grounded_undescribed"] for t in tests)
    assert calls / 2000 <= alpha + 3 * np.sqrt(alpha / 2000), calls


def test_a_grounded_undescribed_cluster_is_called_first_and_leaves_the_reference():
    """A cluster called by the grounded-and-undescribed test is set apart before the set-level test, so it does
    not widen the reference that a second target is compared with; its reason says why it was called."""
    members = np.array([200, 180, 220, 190, 210, 60, 40])
    inconsistent = np.array([10, 8, 12, 9, 11, 30, 6])
    undescribed = np.array([20, 18, 22, 19, 21, 12, 22])
    grounding_p = np.array([1.0, 1.0, 0.2, 1.0, 1.0, 1.0, 1e-4])
    tests = cfbd.inconsistency_test(members, inconsistent, 0.05, undescribed=undescribed, undescribed_base=0.1,
                                    grounding_p=grounding_p)
    assert [t["backdoor"] for t in tests] == [False] * 5 + [True, True]
    # grounded: cluster 6 alone (cluster 2's p 0.2 is above 0.05 / 7), so its count is tested at 0.05 / 1
    assert tests[6]["p_value"] == tests[6]["p_undescribed"] <= tests[6]["level"] == 0.05
    assert [t["grounded"] for t in tests] == [False] * 6 + [True]
    assert "names what the data's pictures show" in cfbd.verdict_reason(tests[6])
    assert "inconsistent with their images" in cfbd.verdict_reason(tests[5])
    without = cfbd.inconsistency_test(members, inconsistent, 0.05)
    assert [t["backdoor"] for t in without] == [False] * 5 + [True, False]
    assert tests[5]["reference_clusters"] == 5 and without[5]["reference_clusters"] == 6
