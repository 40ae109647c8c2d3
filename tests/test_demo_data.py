"""The synthetic demo data: determinism, chunk invariance, CLIP-like geometry, and that it is hard but solvable."""
import numpy as np
import pytest
import torch

from cfbd_fast.demo import (BLOCK_ROWS, DEMO_MODEL, KINDS, TARGET_NAME, DemoGenerator, generate_pairs,
                            generate_reference, write_demo_stores)
from cfbd_fast.errors import InputError
from cfbd_fast.mapper import train_mapper

FPR = 0.001


def _row_cosine(a, b):
    return np.einsum("ij,ij->i", a.astype(np.float64), b.astype(np.float64))


def _tpr_at_fpr(score, positive, fpr=FPR):
    """TPR with the threshold at the (1 - fpr) quantile of the negatives' scores (flag score > threshold)."""
    threshold = np.quantile(score[~positive], 1 - fpr)
    return float(np.mean(score[positive] > threshold))


def test_same_seed_same_data_other_seed_other_data():
    a = generate_pairs(3000, 32, poison_rate=0.01, seed=5)
    b = generate_pairs(3000, 32, poison_rate=0.01, seed=5)
    c = generate_pairs(3000, 32, poison_rate=0.01, seed=6)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.text, b.text)
    assert a.caption == b.caption and a.key == b.key and np.array_equal(a.kind, b.kind)
    assert not np.allclose(a.image, c.image)
    assert not np.array_equal(a.is_poisoned, c.is_poisoned)


def test_shapes_normalization_counts_and_labels():
    rows = 20_000
    pairs = generate_pairs(rows, 48, poison_rate=0.005, hard_negative_rate=0.002, seed=1)
    assert pairs.image.shape == pairs.text.shape == (rows, 48)
    assert pairs.image.dtype == pairs.text.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(pairs.image, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(pairs.text, axis=1), 1.0, atol=1e-5)
    assert len(pairs) == len(pairs.caption) == len(pairs.key) == rows
    assert set(np.unique(pairs.kind)) <= set(KINDS)
    assert int(pairs.is_poisoned.sum()) == 100 and int((pairs.kind == "hard_negative").sum()) == 40
    assert np.array_equal(pairs.is_poisoned, pairs.kind == "poison")
    assert all(len(key) == 9 and key.isdigit() for key in pairs.key) and len(set(pairs.key)) == rows
    assert pairs.key[12345] == "000012345"
    target = pairs.kind == "poison"
    assert all(TARGET_NAME in pairs.caption[i] for i in np.flatnonzero(target | (pairs.kind == "hard_negative")))
    assert 0.05 <= np.mean(pairs.kind == "weak") <= 0.15
    meta = pairs.meta()
    assert set(meta) == {"caption", "key", "is_poisoned"} and sum(meta["is_poisoned"]) == 100


@pytest.mark.parametrize("chunk", [1, 777, BLOCK_ROWS, BLOCK_ROWS + 3, 30_000])
def test_output_does_not_depend_on_chunk_size(chunk):
    generator = DemoGenerator(2 * BLOCK_ROWS + 500, 16, poison_rate=0.01, hard_negative_rate=0.01, seed=2)
    whole = generator.rows(0, len(generator))
    if chunk == 1:  # single rows at block edges
        for row in (0, BLOCK_ROWS - 1, BLOCK_ROWS, len(generator) - 1):
            one = generator.rows(row, row + 1)
            assert np.array_equal(one.image[0], whole.image[row]) and one.caption[0] == whole.caption[row]
        return
    parts = list(generator.chunks(chunk))
    assert np.array_equal(np.concatenate([p.image for p in parts]), whole.image)
    assert np.array_equal(np.concatenate([p.text for p in parts]), whole.text)
    assert [c for p in parts for c in p.caption] == whole.caption
    assert np.array_equal(np.concatenate([p.kind for p in parts]), whole.kind)


def test_clean_data_and_reference_split():
    clean = generate_pairs(10_000, 32, poison_rate=0.0, hard_negative_rate=0.0, seed=3)
    assert not clean.is_poisoned.any() and set(np.unique(clean.kind)) == {"benign", "weak"}
    reference = generate_reference(10_000, 32, seed=3)
    assert not reference.is_poisoned.any() and not (reference.kind == "hard_negative").any()
    assert not np.allclose(reference.image, clean.image)
    # Same domain: a concept looks the same in both splits.
    for concept in np.unique(clean.concept)[:5]:
        a = clean.image[clean.concept == concept].mean(0)
        b = reference.image[reference.concept == concept].mean(0)
        if (clean.concept == concept).sum() > 20 and (reference.concept == concept).sum() > 20:
            assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.9


def test_bad_arguments_raise_input_error():
    for kwargs in ({"rows": 0}, {"rows": 10, "poison_rate": 1.5}, {"rows": 10, "dim": 2},
                   {"rows": 10, "poison_rate": 0.6, "hard_negative_rate": 0.6}):
        with pytest.raises(InputError):
            generate_pairs(**kwargs)
    with pytest.raises(InputError):
        DemoGenerator(10, 16).rows(5, 11)


def test_write_demo_stores_round_trip(tmp_path):
    store_module = pytest.importorskip("cfbd_fast.store")
    scan_path, reference_path = write_demo_stores(tmp_path, rows=3000, dim=16, poison_rate=0.01, seed=4,
                                                  reference_rows=1000, chunk_rows=700, progress=False)
    scan = store_module.EmbeddingStore.open(scan_path)
    reference = store_module.EmbeddingStore.open(reference_path)
    expected = generate_pairs(3000, 16, poison_rate=0.01, seed=4)
    assert len(scan) == 3000 and len(reference) == 1000 and scan.dim == 16
    assert np.array_equal(np.asarray(scan.image), expected.image.astype(np.float16))
    assert np.array_equal(np.asarray(scan.text), expected.text.astype(np.float16))
    assert scan.meta.column("caption").to_pylist() == expected.caption
    assert scan.meta.column("key").to_pylist() == expected.key
    assert scan.meta.column("is_poisoned").to_pylist() == expected.is_poisoned.tolist()
    assert scan.info["model"] == DEMO_MODEL
    assert np.array_equal(np.asarray(reference.text), generate_reference(1000, 16, seed=4).text.astype(np.float16))


@pytest.fixture(scope="module")
def default_data():
    """The default demo data (200k x 512, seed 0) and a linear mapper trained on its clean reference split.

    (A linear map is enough here and trains in seconds; the default MLP separates at least as well.)
    """
    pairs = generate_pairs()
    reference = generate_reference(20_000, 512, seed=0)
    mapper = train_mapper(reference.image, reference.text, depth=1, epochs=3, batch_size=128, lr=3e-3, seed=0)
    mapped = mapper.map(torch.from_numpy(pairs.image)).numpy()
    return pairs, mapped


def test_default_data_is_clip_like(default_data):
    pairs, _ = default_data
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(pairs), 4000), rng.integers(0, len(pairs), 4000)
    matched = _row_cosine(pairs.image, pairs.text)
    benign = pairs.kind == "benign"
    assert 0.25 <= matched[benign].mean() <= 0.35
    assert 0.05 <= _row_cosine(pairs.image[a], pairs.text[b]).mean() <= 0.15
    # Modality gap: each modality in its own cone, far tighter than across modalities.
    assert _row_cosine(pairs.image[a], pairs.image[b]).mean() > 0.35
    assert _row_cosine(pairs.text[a], pairs.text[b]).mean() > 0.35
    assert matched[pairs.kind == "weak"].mean() < matched[benign].mean() - 0.05
    assert matched[pairs.kind == "hard_negative"].mean() > matched[pairs.is_poisoned].mean() + 0.15


def test_cosine_baseline_fails_at_low_fpr(default_data):
    """(a) One-stage CLIP-score filtering (rank by 1 - cos) at FPR 0.001 stays at TPR <= 0.6."""
    pairs, _ = default_data
    tpr = _tpr_at_fpr(1 - _row_cosine(pairs.image, pairs.text), pairs.is_poisoned)
    assert tpr <= 0.6


def test_text_only_verdict_flags_hard_negatives(default_data):
    """(b) z alone, thresholded to catch 98% of poisons, also flags at least half of the hard negatives."""
    pairs, _ = default_data
    z = pairs.text @ pairs.text[pairs.is_poisoned].mean(0)
    threshold = np.quantile(z[pairs.is_poisoned], 0.02)
    assert np.mean(z[pairs.is_poisoned] >= threshold) >= 0.98
    assert np.mean(z[pairs.kind == "hard_negative"] >= threshold) >= 0.5


def test_solvable_with_a_reference_mapper(default_data):
    """(c) c = |s_g - s_o| brings poisons to the top; z - s_o from coherent top-c seeds separates them."""
    pairs, mapped = default_data
    poisoned = pairs.is_poisoned
    s_o = _row_cosine(pairs.image, pairs.text)
    s_g = _row_cosine(pairs.image, mapped)
    c = np.abs(s_g - s_o)
    top = np.argsort(-c, kind="stable")[:200]
    assert poisoned[top[:50]].sum() >= 35 and poisoned[top].sum() >= 60

    # Dense seeds: the 50 top-c candidates whose captions are closest to their 10 nearest fellow candidates.
    candidates = pairs.text[top].astype(np.float64)
    similarity = candidates @ candidates.T
    np.fill_diagonal(similarity, -np.inf)
    density = np.sort(similarity, axis=1)[:, -10:].mean(1)
    seeds = top[np.argsort(-density, kind="stable")[:50]]
    assert poisoned[seeds].mean() >= 0.9
    for seed_rows in (seeds, np.flatnonzero(poisoned)):
        z = pairs.text @ pairs.text[seed_rows].mean(0)
        assert _tpr_at_fpr(z - s_o, poisoned) >= 0.98
