"""The scan's one boundary: invalid rows never reach a fit, bad options and outputs fail first with one line."""
import json

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cfbd_fast import __version__, scan
from cfbd_fast.cli.main import app
from cfbd_fast.demo import generate_pairs, train_demo_mapper, write_demo_stores
from cfbd_fast.mapper import save_mapper
from cfbd_fast.pipeline import V_INVALID
from cfbd_fast.store import EmbeddingStore

runner = CliRunner()


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The same 20,000 pairs twice: as generated, and with 0.05% of rows made invalid (NaN, inf, zero norm)."""
    out = tmp_path_factory.mktemp("inputs")
    _, ref = write_demo_stores(out / "demo", rows=1000, dim=256, poison_rate=0.0, seed=5, reference_rows=20_000,
                               progress=False)
    mapper = save_mapper(train_demo_mapper(ref, seed=5), out / "mapper.safetensors")
    pairs = generate_pairs(rows=20_000, dim=256, poison_rate=0.005, seed=5)
    clean = EmbeddingStore.from_arrays(out / "clean.cfbd", image=pairs.image.astype(np.float16),
                                       text=pairs.text.astype(np.float16), meta=pairs.meta(), model="cfbd-fast-demo")
    clean.close()
    rng = np.random.default_rng(0)
    bad = np.sort(rng.choice(len(pairs.image), size=10, replace=False))
    image, text = pairs.image.copy(), pairs.text.copy()
    for i, row in enumerate(bad):
        target = image if i % 2 else text
        target[row] = (np.nan, np.inf, 0.0)[i % 3]
    EmbeddingStore.from_arrays(out / "bad.cfbd", image=image.astype(np.float16), text=text.astype(np.float16),
                               meta=pairs.meta(), model="cfbd-fast-demo").close()
    return out / "clean.cfbd", out / "bad.cfbd", bad, mapper


CASES = [("file", "cfbd"), ("file", "cfbd-paper"), ("file", "coarse"), ("file", "cosine"), ("file", "safeclip"),
         ("self", "cfbd"), ("knn", "cfbd")]


@pytest.mark.parametrize("mapper_kind,method", CASES)
def test_invalid_rows_change_no_verdict_of_a_valid_row(stores, mapper_kind, method):
    clean, bad, bad_rows, mapper_file = stores
    mapper = str(mapper_file) if mapper_kind == "file" else mapper_kind
    a = scan(clean, mapper, method=method)
    b = scan(bad, mapper, method=method)
    assert b.invalid_rows.tolist() == bad_rows.tolist()
    assert (b.verdict[bad_rows] == V_INVALID).all()
    keep = np.ones(len(a.verdict), dtype=bool)
    keep[bad_rows] = False
    assert a.summary["metrics"]["positives"] > 0
    if method == "cfbd":
        assert a.summary["metrics"]["tpr"] >= 0.7  # the comparison is not between two empty verdicts
    flips = np.flatnonzero(keep & (a.verdict != b.verdict))
    if method in ("coarse", "safeclip"):
        # Their GMM is refitted on 10 fewer scores: only a row whose posterior sits at the cut may change side.
        statistic, cut = (a.posterior, 0.9) if method == "coarse" else (a.score, 0.1)
        assert len(flips) <= 10 and np.all(np.abs(statistic[flips] - cut) < 0.01), (flips, statistic[flips])
    else:
        np.testing.assert_array_equal(a.verdict[keep], b.verdict[keep])


def test_self_fit_mapper_never_sees_an_invalid_row(stores, tmp_path):
    """With NaN rows in the store a self-fitted mapper still learns (it used to train on NaN and explain nothing)."""
    _, bad, _, _ = stores
    result = scan(bad, "self")
    assert result.summary["metrics"]["auroc"] >= 0.98, result.summary["metrics"]
    res = runner.invoke(app, ["train-mapper", str(bad), "--out", str(tmp_path / "m.safetensors"), "--depth", "1",
                              "--epochs", "2", "--batch-size", "256", "--quiet", "--json"])
    assert res.exit_code == 0, res.output
    config = json.loads(res.output)["config"]
    assert config["invalid_rows_skipped"] == 10 and config["val_loss"] < config["initial_val_loss"] - 0.05


def test_a_mapper_that_does_not_learn_is_an_error(tmp_path):
    pairs = generate_pairs(rows=3000, dim=16, poison_rate=0.0, seed=1, concepts=30)
    rng = np.random.default_rng(1)
    path = EmbeddingStore.from_arrays(tmp_path / "noise.cfbd", image=rng.normal(size=(3000, 16)).astype(np.float16),
                                      text=pairs.text.astype(np.float16), model="m").path
    out = tmp_path / "m.safetensors"
    res = runner.invoke(app, ["train-mapper", str(path), "--out", str(out), "--depth", "1", "--epochs", "2",
                              "--lr", "1e-9", "--quiet"])
    assert res.exit_code == 1 and "did not learn" in res.output and len(res.output.strip().splitlines()) == 1
    assert not out.exists()


# -- the CLI's one-line errors, each before any work and leaving nothing behind ----------------------------
def _fails(args, *needles, code=1):
    res = runner.invoke(app, args)
    assert res.exit_code == code, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1, res.output
    for needle in needles:
        assert needle in lines[0], res.output
    assert "[Errno" not in res.output and "Traceback" not in res.output
    return lines[0]


@pytest.mark.parametrize("option,value,needle", [
    ("--q", "0", "seed_set_size (--seed-set-size) must be a whole number from 1 to"),
    ("--k", "0", "components (--components) must be a whole number from 1 to"),
    ("--gamma", "2", "gamma (--gamma) must be between 0 and 1 (exclusive), got 2.0"),
    ("--fpr", "2", "fpr (--fpr) must be between 0 and 1 (exclusive), got 2.0"),
    ("--threshold", "nan", "threshold (--threshold) must be a finite number, got nan"),
    ("--chunk-rows", "0", "chunk_rows (--chunk-rows) must be a whole number from 1 to"),
])
def test_option_ranges_have_one_message(stores, tmp_path, option, value, needle):
    clean, _, _, mapper = stores
    out = tmp_path / "scan"
    _fails(["scan", str(clean), "--mapper", str(mapper), "--out", str(out), "--quiet", option, value], needle)
    assert not out.exists()


def test_outputs_are_checked_before_the_scan(stores, tmp_path):
    clean, _, _, mapper = stores
    a_file = tmp_path / "taken"
    a_file.write_text("keep me")
    _fails(["scan", str(clean), "--mapper", str(mapper), "--out", str(a_file), "--quiet"], "is a file")
    assert a_file.read_text() == "keep me"
    out = tmp_path / "scan"
    res = runner.invoke(app, ["scan", str(clean), "--mapper", str(mapper), "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    before = (out / "summary.json").read_bytes()
    _fails(["scan", str(clean), "--mapper", str(mapper), "--out", str(out), "--quiet", "--method", "cosine"],
           "--force")
    assert (out / "summary.json").read_bytes() == before
    res = runner.invoke(app, ["scan", str(clean), "--mapper", str(mapper), "--out", str(out), "--quiet",
                              "--method", "cosine", "--force"])
    assert res.exit_code == 0 and json.loads((out / "summary.json").read_text())["config"]["method"] == "cosine"


def test_outputs_a_person_can_read(stores, tmp_path):
    clean, _, _, mapper = stores
    result = scan(clean, mapper)
    out = result.write(tmp_path / "scan")
    import pyarrow as pa

    flagged = pacsv.read_csv(out / "flagged.csv",
                             convert_options=pacsv.ConvertOptions(column_types={"key": pa.string()}))
    assert flagged.num_rows == len(result.poisoned_rows) > 0
    assert flagged.column("key").to_pylist() == (out / "poisoned.txt").read_text().split()
    assert all("banana" in caption for caption in flagged.column("caption").to_pylist()[:5])
    kept = pq.read_table(out / "keep.parquet")
    assert set(EmbeddingStore.open(clean).meta.column_names) <= set(kept.column_names)
    summary = json.loads((out / "summary.json").read_text())
    assert all(type(k) is str for k in result.summary["counts"]["verdict"])
    assert summary["versions"]["cfbd-fast"] == __version__


def test_json_errors_and_version(stores, tmp_path):
    clean, _, _, mapper = stores
    res = runner.invoke(app, ["scan", str(tmp_path / "missing.cfbd"), "--mapper", str(mapper), "--json"])
    assert res.exit_code == 1
    error = json.loads(res.output)
    assert "missing.cfbd" in error["error"] and "[Errno" not in error["error"] and error["exit_code"] == 1
    res = runner.invoke(app, ["scan", str(clean), "--mapper", str(mapper), "--json", "--method", "bogus"])
    assert res.exit_code == 2 and "bogus" in json.loads(res.output)["error"]
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"cfbd-fast {__version__}"


def test_python_errors_name_keywords_too(stores):
    clean, _, _, mapper = stores
    with pytest.raises(ValueError, match=r"seed_set_size \(--seed-set-size\)"):
        scan(clean, mapper, q=0)
    with pytest.raises(ValueError, match="unknown scan option 'bogus'"):
        scan(clean, mapper, bogus=1)


def test_from_npy_validates_metadata_first_and_leaves_nothing(tmp_path):
    import pyarrow as pa

    rng = np.random.default_rng(2)
    np.save(tmp_path / "img.npy", rng.normal(size=(300, 8)).astype(np.float32))
    np.save(tmp_path / "txt.npy", rng.normal(size=(300, 8)).astype(np.float32))
    pq.write_table(pa.table({"title": [f"t{i}" for i in range(300)]}), tmp_path / "meta.parquet")
    out = tmp_path / "s.cfbd"
    args = ["store", "from-npy", str(out), "--image", str(tmp_path / "img.npy"), "--text", str(tmp_path / "txt.npy"),
            "--quiet"]
    _fails(args + ["--meta", str(tmp_path / "meta.parquet")], "meta.parquet", "no 'caption' and no key column")
    assert not out.exists()
    res = runner.invoke(app, args)  # the rerun is not blocked; without metadata, keys are row ids
    assert res.exit_code == 0, res.output
    result = scan(out, method="cosine")
    written = result.write(tmp_path / "scan")
    keys = (written / "keep.txt").read_text().split() + (written / "poisoned.txt").read_text().split()
    assert "None" not in keys and sorted(map(int, keys)) == list(range(300))
