"""Mapping networks: MLP training and early stopping, save/load without pickle, self-fit, kNN, train-mapper CLI."""
import json

import numpy as np
import pytest
import torch
import typer
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from cfbd_fast.cli import mapper as mapper_cli
from cfbd_fast.cli.main import _Group
from cfbd_fast.demo import generate_pairs, generate_reference
from cfbd_fast.errors import InputError, MapperMismatchError
from cfbd_fast.mapper import (KNN_GATHER_BYTES, KnnMapper, MLPMapper, fit_self_mapper, load_mapper, save_mapper,
                              train_mapper)
from cfbd_fast.pipeline.options import ScanConfig
from cfbd_fast.pipeline.global_steps import GlobalSteps
from cfbd_fast.pipeline.source import ChunkSource
from cfbd_fast.pipeline.mapping import resolve_mapper
from cfbd_fast.store import EmbeddingStore

SMALL = {"depth": 2, "hidden": 64, "batch_size": 256, "lr": 3e-3}


@pytest.fixture(scope="module")
def reference():
    return generate_reference(4000, 32, seed=11, concepts=60)


def _state(mapper):
    return {name: value.clone() for name, value in mapper.state_dict().items()}


def test_training_lowers_validation_loss_and_is_deterministic(reference):
    first = train_mapper(reference.image, reference.text, epochs=5, seed=3, **SMALL)
    again = train_mapper(reference.image, reference.text, epochs=5, seed=3, **SMALL)
    other = train_mapper(reference.image, reference.text, epochs=5, seed=4, **SMALL)
    config = first.config
    assert config["val_loss"] < 0.5 * config["initial_val_loss"]
    assert config["train_rows"] + config["val_rows"] == 4000 and config["val_rows"] == 200
    for name, value in _state(first).items():
        assert torch.equal(value, again.state_dict()[name])
    assert not torch.equal(first.state_dict()["layers.0.weight"], other.state_dict()["layers.0.weight"])
    json.dumps(config)


def test_early_stopping_keeps_the_best_epoch(reference):
    # A wide net on 300 pairs overfits quickly: validation loss turns up and training stops.
    mapper = train_mapper(reference.image[:300], reference.text[:300], depth=2, hidden=512, batch_size=32,
                          lr=1e-2, epochs=200, patience=2, val_fraction=0.2, seed=0)
    config = mapper.config
    assert config["stopped_early"] and config["epochs_run"] < 200
    assert config["epochs_run"] == config["best_epoch"] + 2
    image = torch.from_numpy(reference.image[:300])
    rows = np.arange(300)
    # The returned weights are the best epoch's: re-evaluating them gives the recorded validation loss.
    rng = np.random.default_rng(0)
    shuffled = rows[rng.permutation(300)]
    val_rows = np.sort(shuffled[:60])
    mapped = mapper.map(image[val_rows])
    text = torch.nn.functional.normalize(torch.from_numpy(reference.text[val_rows]), dim=-1)
    assert float((1 - (mapped * text).sum(-1)).mean()) == pytest.approx(config["val_loss"], abs=1e-5)


def test_infonce_loss_and_fp16_memmap_input(tmp_path, reference):
    np.save(tmp_path / "image.npy", reference.image.astype(np.float16))
    np.save(tmp_path / "text.npy", reference.text.astype(np.float16))
    image = np.load(tmp_path / "image.npy", mmap_mode="r")
    text = np.load(tmp_path / "text.npy", mmap_mode="r")
    assert not image.flags.writeable
    from_memmap = train_mapper(image, text, loss="infonce", epochs=3, max_rows=2000, seed=1, **SMALL)
    from_copy = train_mapper(image.astype(np.float32), text.astype(np.float32), loss="infonce", epochs=3,
                             max_rows=2000, seed=1, **SMALL)
    assert from_memmap.config["val_loss"] < from_memmap.config["initial_val_loss"]
    assert from_memmap.config["train_rows"] + from_memmap.config["val_rows"] == 2000
    for name, value in _state(from_memmap).items():
        assert torch.equal(value, from_copy.state_dict()[name])


def test_bad_training_arguments(reference):
    with pytest.raises(InputError, match="loss"):
        train_mapper(reference.image, reference.text, loss="mse")
    with pytest.raises(InputError):
        train_mapper(reference.image[:1], reference.text[:1])
    with pytest.raises(InputError):
        train_mapper(reference.image, reference.text[:10])
    with pytest.raises(InputError):
        train_mapper(reference.image, reference.text, val_fraction=0.0)


def test_mlp_shapes_and_normalization():
    mapper = MLPMapper(16, 24, depth=3, hidden=8)
    image = torch.randn(5, 16)
    assert mapper(image).shape == (5, 24) and mapper(image).dtype == torch.float32
    torch.testing.assert_close(mapper(image), mapper(3.0 * image))  # inputs are normalized first
    mapped = mapper.map(image.half())
    assert mapped.dtype == torch.float32
    torch.testing.assert_close(mapped.norm(dim=1), torch.ones(5))
    assert len([m for m in mapper.layers if isinstance(m, torch.nn.Linear)]) == 3
    assert isinstance(MLPMapper(16, 16, depth=1).layers[0], torch.nn.Linear)


def test_save_load_round_trip_is_bit_exact(tmp_path, reference):
    mapper = train_mapper(reference.image, reference.text, epochs=2, seed=0, model="ViT-B-32", pretrained="openai",
                          **SMALL)
    path = save_mapper(mapper, tmp_path / "f.safetensors")
    sidecar = tmp_path / "f.json"
    assert path.exists() and sidecar.exists()
    assert json.loads(sidecar.read_text()) == json.loads(json.dumps(mapper.config))
    assert b"pickle" not in path.read_bytes()[:64]
    loaded = load_mapper(path, expect_model="ViT-B-32", expect_dim=32)
    image = torch.from_numpy(reference.image[:500])
    assert torch.equal(loaded.map(image), mapper.map(image))
    assert loaded.config == json.loads(json.dumps(mapper.config))
    # The weights file alone is enough: its header carries the config.
    sidecar.unlink()
    assert torch.equal(load_mapper(path).map(image), mapper.map(image))


def test_load_refuses_other_models_and_dims(tmp_path, reference):
    mapper = train_mapper(reference.image, reference.text, epochs=1, model="ViT-B-32", pretrained="openai", **SMALL)
    path = save_mapper(mapper, tmp_path / "f.safetensors")
    with pytest.raises(MapperMismatchError, match="ViT-L-14") as info:
        load_mapper(path, expect_model="ViT-L-14")
    assert str(path) in str(info.value)
    with pytest.raises(MapperMismatchError, match="64-dim"):
        load_mapper(path, expect_dim=64)
    with pytest.raises(MapperMismatchError, match="laion2b"):
        load_mapper(path, expect_pretrained="laion2b")
    load_mapper(path, expect_model="ViT-B-32", expect_dim=32, expect_pretrained="openai")


def test_load_missing_or_corrupt_files(tmp_path, reference):
    missing = tmp_path / "none.safetensors"
    with pytest.raises(InputError, match="not found") as info:
        load_mapper(missing)
    assert str(missing) in str(info.value)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(InputError, match="garbage.safetensors"):
        load_mapper(garbage)
    good = save_mapper(train_mapper(reference.image, reference.text, epochs=1, **SMALL), tmp_path / "g.safetensors")
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(InputError, match="t.safetensors"):
        load_mapper(truncated)
    with pytest.raises(InputError, match=".json"):
        save_mapper(MLPMapper(4, 4), tmp_path / "m.json")


def test_self_mapper_resists_a_few_percent_poisons():
    pairs = generate_pairs(6000, 32, poison_rate=0.05, hard_negative_rate=0.0, seed=7, concepts=60)
    reference = generate_reference(6000, 32, seed=7, concepts=60)
    image = torch.from_numpy(pairs.image)
    s_o = (pairs.image * pairs.text).sum(1)

    def consistency(mapper):
        s_g = (pairs.image * mapper.map(image).numpy()).sum(1)
        return np.abs(s_g - s_o), s_g

    options = dict(SMALL, epochs=8)
    c_ref, _ = consistency(train_mapper(reference.image, reference.text, **options))
    untrimmed = fit_self_mapper(pairs.image, pairs.text, trim=0.0, rounds=1, **options)
    trimmed = fit_self_mapper(pairs.image, pairs.text, trim=0.1, rounds=2, **options)
    c_self, s_g_self = consistency(trimmed)
    _, s_g_untrimmed = consistency(untrimmed)
    assert trimmed.config["fit"] == "self" and trimmed.config["fit_rows"] == 5400
    assert roc_auc_score(pairs.is_poisoned, c_self) >= roc_auc_score(pairs.is_poisoned, c_ref) - 0.03
    # Trimming the worst-fitting rows keeps the mapper from learning "trigger -> target caption".
    assert s_g_self[pairs.is_poisoned].mean() > s_g_untrimmed[pairs.is_poisoned].mean()


def _knn_reference(query, bank, bank_rows, rows, k):
    q = query.astype(np.float64) / np.linalg.norm(query, axis=1, keepdims=True)
    b = bank.astype(np.float64) / np.linalg.norm(bank, axis=1, keepdims=True)
    similarity = q @ b.T
    if rows is not None:
        similarity[bank_rows[None, :] == np.asarray(rows)[:, None]] = -np.inf
    nearest = np.argsort(-similarity, axis=1)[:, :k]
    mean = b[nearest].mean(1)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def test_knn_matches_a_float64_reference():
    rng = np.random.default_rng(0)
    bank, query = rng.standard_normal((300, 16)), rng.standard_normal((50, 16))
    bank_rows = np.sort(rng.choice(1000, 300, replace=False))
    rows = np.concatenate([bank_rows[:25], rng.choice(np.setdiff1d(np.arange(1000), bank_rows), 25)])
    mapper = KnnMapper(bank, bank_rows, k=7, query_block=16)
    for query_rows in (rows, None):
        got = mapper.map(torch.from_numpy(query).float(), query_rows).numpy()
        np.testing.assert_allclose(got, _knn_reference(query, bank, bank_rows, query_rows, 7), atol=1e-5)


def test_knn_with_many_neighbours_gathers_in_bounded_blocks():
    """k close to the bank: a query block's neighbours (block x k x dim) are capped by KNN_GATHER_BYTES (here 1,398
    queries of 1,500 at a time), with the same answer."""
    rng = np.random.default_rng(3)
    bank, query = rng.standard_normal((3000, 16)), rng.standard_normal((1500, 16))
    k = 2999
    assert KNN_GATHER_BYTES // (k * 16 * 4) < len(query)
    got = KnnMapper(bank, np.arange(3000), k=k).map(torch.from_numpy(query).float(), None).numpy()
    np.testing.assert_allclose(got, _knn_reference(query, bank, np.arange(3000), None, k), atol=1e-5)


def test_knn_leaves_out_the_pairs_own_caption_but_not_a_duplicate():
    rng = np.random.default_rng(1)
    bank = rng.standard_normal((50, 8)).astype(np.float32)
    image = rng.standard_normal((1, 8)).astype(np.float32)
    bank[5] = image[0]  # the pair's own caption (row 105) is the closest caption to its image
    bank[9] = image[0]  # an exact duplicate caption from another pair (row 109)
    bank_rows = np.arange(100, 150)
    mapper = KnnMapper(bank, bank_rows, k=1)
    unit = image / np.linalg.norm(image)
    np.testing.assert_allclose(mapper.map(torch.from_numpy(image), np.array([105])).numpy(), unit, atol=1e-6)
    bank[9] = rng.standard_normal(8)
    mapper = KnnMapper(bank, bank_rows, k=1)
    own_left_out = mapper.map(torch.from_numpy(image), np.array([105])).numpy()
    assert float((own_left_out @ unit.T)[0, 0]) < 0.999
    np.testing.assert_allclose(own_left_out, _knn_reference(image, bank, bank_rows, [105], 1), atol=1e-6)
    np.testing.assert_allclose(mapper.map(torch.from_numpy(image), None).numpy(), unit, atol=1e-6)


def test_knn_bank_from_valid_rows_of_the_scanned_store(tmp_path):
    pairs = generate_pairs(3000, 16, poison_rate=0.0, seed=2, concepts=30)
    text = pairs.text.copy()
    text[[5, 700, 2999]] = np.nan  # invalid captions never enter the bank
    source = GlobalSteps(ChunkSource(EmbeddingStore.from_arrays(tmp_path / "s.cfbd", image=pairs.image, text=text,
                                                                model="ViT-B-32")))
    mapper, fingerprint = resolve_mapper("knn", source, ScanConfig(knn_bank=500, knn_neighbours=4, random_seed=3), False)
    assert fingerprint.startswith("knn:")
    assert 497 <= len(mapper.bank_rows) <= 500 and np.all(np.diff(mapper.bank_rows) > 0)
    assert not set(mapper.bank_rows.tolist()) & {5, 700, 2999}
    expected = np.asarray(text[mapper.bank_rows], dtype=np.float32)
    np.testing.assert_allclose(mapper.bank.numpy(), expected / np.linalg.norm(expected, axis=1, keepdims=True),
                               atol=1e-6)
    assert mapper.config["model"] == "ViT-B-32" and mapper.config["k"] == 4
    everything, _ = resolve_mapper("knn", source, ScanConfig(knn_bank=10**6), False)
    assert len(everything.bank_rows) == 2997
    mapped = mapper.to("cpu").map(torch.from_numpy(pairs.image[:10]), np.arange(10))
    assert mapped.shape == (10, 16)
    with pytest.raises(InputError):
        KnnMapper(np.ones((3, 4)), [0, 2, 1], k=1)
    with pytest.raises(InputError):
        KnnMapper(np.ones((3, 4)), [0, 1, 2], k=3)


@pytest.fixture
def cli():
    app = typer.Typer(cls=_Group)
    app.command("train-mapper")(mapper_cli.train_mapper)
    app.command("other")(lambda: None)  # two commands, so the app keeps its subcommand name
    return lambda *args: CliRunner().invoke(app, ["train-mapper", *map(str, args)])


def test_cli_trains_and_saves(tmp_path, cli, reference):
    store_path = tmp_path / "ref.cfbd"
    EmbeddingStore.from_arrays(store_path, image=reference.image, text=reference.text, model="ViT-B-32").close()
    out = tmp_path / "models" / "f.safetensors"
    result = cli(store_path, "--out", out, "--hidden", 32, "--epochs", 2, "--batch-size", 256, "--quiet")
    assert result.exit_code == 0, result.output
    assert "val loss" in result.output and out.exists() and out.with_suffix(".json").exists()
    assert load_mapper(out, expect_model="ViT-B-32", expect_dim=32).config["hidden"] == 32
    result = cli(store_path, "--out", out, "--depth", 1, "--epochs", 1, "--quiet")
    assert result.exit_code == 1 and "--force" in result.output
    result = cli(store_path, "--out", out, "--depth", 1, "--epochs", 1, "--max-rows", 1000, "--loss", "infonce",
                 "--quiet", "--json", "--force")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["config"]["depth"] == 1 and summary["config"]["loss"] == "infonce"
    assert summary["config"]["train_rows"] + summary["config"]["val_rows"] == 1000


def test_cli_errors(tmp_path, cli):
    result = cli(tmp_path / "missing.cfbd", "--out", tmp_path / "f.safetensors")
    assert result.exit_code == 1 and "missing.cfbd" in result.output and "not found" in result.output
    empty = tmp_path / "empty.cfbd"
    EmbeddingStore.create(empty, 8).close()
    result = cli(empty, "--out", tmp_path / "f.safetensors", "--quiet")
    assert result.exit_code == 1 and "0 rows" in result.output
    not_a_store = tmp_path / "plain"
    not_a_store.mkdir()
    result = cli(not_a_store, "--out", tmp_path / "f.safetensors", "--quiet")
    assert result.exit_code == 1 and "not a cfbd store" in result.output
    result = cli(empty, "--out", tmp_path / "f.safetensors", "--loss", "mse")
    assert result.exit_code == 2
    result = cli(tmp_path / "x.cfbd")
    assert result.exit_code == 2 and "--out" in result.output
    if not torch.cuda.is_available():
        result = cli(empty, "--out", tmp_path / "f.safetensors", "--device", "cuda")
        assert result.exit_code == 1 and "no CUDA device" in result.output
