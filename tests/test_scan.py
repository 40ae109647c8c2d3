"""The scan pipeline end to end on real stores written to disk, a real trained mapper, and the CLI."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cfbd_fast.cli.main import app
from cfbd_fast.demo import generate_pairs, train_demo_mapper, write_demo_stores
from cfbd_fast.mapper import save_mapper
from cfbd_fast.pipeline import SUBSETS, V_INVALID, V_POISONED, scan
from cfbd_fast.store import EmbeddingStore

runner = CliRunner()


def _demo(tmp_path_factory, name, rows, poison_rate, seed=0):
    out = tmp_path_factory.mktemp(name)
    scan_store, ref_store = write_demo_stores(out, rows=rows, dim=256, poison_rate=poison_rate, seed=seed,
                                              reference_rows=20_000, progress=False)
    return scan_store, save_mapper(train_demo_mapper(ref_store, seed=seed), out / "mapper.safetensors")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """20k rows, 256 dims, 0.5% poisoned: a store + a mapper trained on its clean split."""
    return _demo(tmp_path_factory, "small", 20_000, 0.005)


def _near_cut(verdict_a, verdict_b, p_value, p_cut):
    """Verdicts that differ belong to rows whose p-value sits at the cut (float rounding decides them)."""
    differ = verdict_a != verdict_b
    return bool(np.all(np.abs(np.log(p_value[differ]) - np.log(p_cut)) < 1e-3)), int(differ.sum())


def test_scan_finds_poisons_and_writes_outputs(small, tmp_path):
    store_path, mapper = small
    result = scan(store_path, mapper)
    s = result.summary
    assert s["cluster"]["found"]
    m = s["metrics"]
    # The default row cut (--fdr 0.01) was chosen on real images, where 0.05 flags the genuine target-class pairs;
    # on this synthetic world it keeps 0.76-0.86 of the poisons (those whose template is far from the seeds fall
    # below it) and no clean row: see tests/test_demo_quality.py.
    assert m["tpr"] >= 0.75 and m["fpr"] <= 0.002, m
    assert m["seed_precision"] >= 0.9
    out = result.write(tmp_path / "out")
    names = {p.name for p in out.iterdir()}
    assert {"scores.parquet", "poisoned.txt", "keep.txt", "keep.parquet", "summary.json", "invalid.txt"} <= names
    assert not [n for n in names if n.startswith(".") and n != ".lock"], "temporary files left behind"
    scores = pq.read_table(out / "scores.parquet")
    assert scores.num_rows == len(result.verdict)
    assert set(scores.column_names) >= {"row_id", "key", "s_o", "s_g", "c", "posterior", "subset", "z", "score",
                                        "verdict"}
    poisoned = (out / "poisoned.txt").read_text().split()
    keep = (out / "keep.txt").read_text().split()
    assert len(poisoned) == m["flagged"] and len(poisoned) + len(keep) == len(result.verdict)
    assert not set(poisoned) & set(keep)
    kept_meta = pq.read_table(out / "keep.parquet")
    assert kept_meta.column("key").to_pylist() == keep
    summary = json.loads((out / "summary.json").read_text())
    assert summary["store"]["fingerprint"] and summary["mapper"].startswith("file:")
    assert summary["counts"]["verdict"]["poisoned"] == len(poisoned)


def test_scan_verdicts_do_not_depend_on_chunk_size(small):
    store_path, mapper = small
    a = scan(store_path, mapper, chunk_rows=65536)
    b = scan(store_path, mapper, chunk_rows=777)
    assert a.summary["seeds"] == b.summary["seeds"]
    ok, n = _near_cut(a.verdict, b.verdict, a.p_value, a.summary["threshold"]["p_cut"])
    assert ok, f"{n} verdicts differ away from the cut"


def test_scan_triton_interpreted_matches_cpu(tmp_path):
    """The Triton kernels (run by the interpreter on CPU) give the same verdicts as the CPU path."""
    out = tmp_path / "d"
    store_path, ref = write_demo_stores(out, rows=3000, dim=32, poison_rate=0.01, seed=3, reference_rows=3000,
                                        progress=False)
    save_mapper(train_demo_mapper(ref, seed=3), out / "m.safetensors")
    code = (
        "import sys, numpy as np; from cfbd_fast.pipeline import scan; "
        f"r = scan({str(store_path)!r}, {str(out / 'm.safetensors')!r}, q=20, chunk_rows=1024); "
        "np.savez(sys.argv[1], verdict=r.verdict, score=r.score, p=r.p_value, cut=r.summary['threshold']['p_cut'])"
    )
    results = {}
    for impl in ("cpu", "triton"):
        env = {**os.environ, "CFBD_FAST_IMPL": impl}
        if impl == "triton":
            env["TRITON_INTERPRET"] = "1"
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"{impl}.npz")], env=env, check=True)
        results[impl] = np.load(tmp_path / f"{impl}.npz")
    a, b = results["cpu"], results["triton"]
    assert _near_cut(a["verdict"], b["verdict"], a["p"], float(a["cut"]))[0]
    np.testing.assert_allclose(a["score"], b["score"], atol=1e-4, equal_nan=True)


def test_clean_store_reports_no_cluster(tmp_path_factory):
    store_path, mapper = _demo(tmp_path_factory, "clean", 20_000, 0.0)
    result = scan(store_path, mapper)
    assert not result.summary["cluster"]["found"]
    assert result.summary["metrics"]["fpr"] <= 0.001
    out = runner.invoke(app, ["scan", str(store_path), "--mapper", str(mapper), "--quiet",
                              "--out", str(store_path.parent / "scan")])
    assert out.exit_code == 0, out.output
    assert "no backdoor cluster found" in out.output


def test_fewer_poisons_than_q(tmp_path_factory):
    store_path, mapper = _demo(tmp_path_factory, "few", 20_000, 0.0015)  # 30 poisons, q = 50
    result = scan(store_path, mapper, q=50)
    m = result.summary["metrics"]
    assert m["positives"] == 30
    assert result.summary["cluster"]["found"]
    assert m["tpr"] >= 0.85 and m["false_positives"] <= 20, m  # --fdr 0.01: see above


def test_invalid_rows_get_their_own_verdict(tmp_path, small):
    _, mapper = small
    pairs = generate_pairs(rows=5000, dim=256, poison_rate=0.01, seed=1)
    image, text = pairs.image.copy(), pairs.text.copy()
    image[10] = np.nan
    text[20] = 0.0
    image[30, 5] = np.inf
    path = EmbeddingStore.from_arrays(tmp_path / "bad.cfbd", image=image.astype(np.float16),
                                      text=text.astype(np.float16), meta=pairs.meta(), model="cfbd-fast-demo").path
    result = scan(path, mapper, q=20)
    assert result.invalid_rows.tolist() == [10, 20, 30]
    assert np.isnan(result.c[[10, 20, 30]]).all()
    assert result.summary["counts"]["subset"]["invalid"] == 3
    assert (result.verdict[[10, 20, 30]] == V_INVALID).all()
    assert (result.verdict == V_POISONED).sum() > 0
    out = result.write(tmp_path / "out")
    assert len((out / "invalid.txt").read_text().split()) == 3


@pytest.mark.parametrize("method", ["cfbd-paper", "coarse", "cosine", "safeclip"])
def test_other_methods_run_and_report(small, method):
    store_path, mapper = small
    result = scan(store_path, mapper, method=method)
    m = result.summary["metrics"]
    poisoned = result.verdict == V_POISONED
    assert m["flagged"] == poisoned.sum() and 0.5 <= m["auroc"] <= 1.0
    # each method's verdict is its own rule applied to its score and the threshold the summary reports
    threshold = result.summary["threshold"]["value"]
    seeds, suspicious = (result.subset == SUBSETS.index(name) for name in ("seed", "suspicious"))
    if method == "coarse":  # everything not confidently benign is flagged
        np.testing.assert_array_equal(poisoned, seeds | suspicious)
    elif method == "cfbd-paper":  # the seeds, and the suspicious rows above the threshold on z
        np.testing.assert_array_equal(poisoned, seeds | (suspicious & (result.score > threshold)))
    else:  # cosine and safeclip: every valid row above the threshold
        np.testing.assert_array_equal(poisoned, np.nan_to_num(result.score, nan=-np.inf) > threshold)
    if method == "cosine":  # its default threshold flags the --fpr share of rows
        assert poisoned.sum() <= int(np.ceil(0.001 * len(poisoned))) + 1


def test_labels_file_overrides_store_labels(small, tmp_path):
    store_path, mapper = small
    keys = EmbeddingStore.open(store_path).meta.column("key").to_pylist()
    (tmp_path / "labels.csv").write_text("key,label\n" + "".join(f"{k},{int(i < 10)}\n" for i, k in enumerate(keys)))
    result = scan(store_path, mapper, labels=tmp_path / "labels.csv")
    assert result.summary["metrics"]["positives"] == 10


# -- CLI -----------------------------------------------------------------------------------------------
def test_cli_scan_json(small, tmp_path):
    store_path, mapper = small
    out = runner.invoke(app, ["scan", str(store_path), "--mapper", str(mapper), "--out", str(tmp_path / "o"),
                              "--json", "--quiet"])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.output)
    assert summary["metrics"]["tpr"] >= 0.75  # --fdr 0.01 on the synthetic world: see above
    assert (tmp_path / "o" / "summary.json").exists()


def test_cli_errors(small, tmp_path):
    store_path, mapper = small

    def fails(args, *needles):
        res = runner.invoke(app, ["scan", *args, "--quiet"])
        assert res.exit_code != 0, res.output
        text = res.output.lower()
        for needle in needles:
            assert needle.lower() in text, res.output
        return res

    fails([str(tmp_path / "missing.cfbd"), "--mapper", str(mapper)], "missing.cfbd")
    fails([str(store_path)], "needs a mapping network")
    fails([str(store_path), "--mapper", str(tmp_path / "nope.safetensors")], "nope.safetensors")
    fails([str(store_path), "--mapper", str(mapper), "--q", "10000000"], "larger than the store")
    fails([str(store_path), "--mapper", str(mapper), "--method", "bogus"], "bogus")
    fails([str(store_path), "--mapper", str(mapper), "--labels", str(tmp_path / "l.csv")], "l.csv")
    for inside in (store_path, store_path / "meta"):  # scan files never land in a store
        fails([str(store_path), "--mapper", str(mapper), "--out", str(inside)], "inside a store")
    import torch

    if not torch.cuda.is_available():
        fails([str(store_path), "--mapper", str(mapper), "--device", "cuda"], "no cuda device")
    # a mapper made for another embedding dimension
    other = tmp_path / "other"
    _, ref = write_demo_stores(other, rows=2000, dim=32, poison_rate=0.0, reference_rows=2000, progress=False)
    save_mapper(train_demo_mapper(ref, epochs=1), other / "m32.safetensors")
    fails([str(store_path), "--mapper", str(other / "m32.safetensors")], "m32")
    # an empty store
    empty = EmbeddingStore.create(tmp_path / "empty.cfbd", 256, model="cfbd-fast-demo")
    empty.close()
    fails([str(tmp_path / "empty.cfbd"), "--mapper", str(mapper)], "empty")


@pytest.mark.parametrize("mapper", ["self", "knn"])
def test_mappers_fitted_on_the_scanned_store(small, mapper):
    """No clean reference set: the mapper comes from the scanned store itself."""
    store_path, _ = small
    result = scan(store_path, mapper)
    s = result.summary
    assert s["mapper"].startswith(f"{mapper}:")
    assert s["cluster"]["found"], s["cluster"]
    assert s["metrics"]["tpr"] >= 0.75 and s["metrics"]["fpr"] <= 0.002, s["metrics"]  # --fdr 0.01: see above


# -- the output folder -----------------------------------------------------------------------------------------
def _scan_process(store_path, mapper, out, *extra, env=None):
    return subprocess.Popen([sys.executable, "-m", "cfbd_fast.cli.main", "scan", str(store_path), "--mapper",
                             str(mapper), "--out", str(out), "--quiet", *extra], text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                         "NUMBA_NUM_THREADS": "1", **(env or {})})


def test_a_second_scan_of_the_same_out_refuses_while_the_first_holds_it(small, tmp_path):
    """A scan holds --out's writer lock for the whole scan: a second one (even with --force) refuses at once with
    one line naming the holder's pid; once the holder is killed (kill -9), the OS has released the lock, nothing
    was published, and the next scan runs."""
    store_path, mapper = small
    out = tmp_path / "o"
    holder = _scan_process(store_path, mapper, out, env={"CFBD_FAST_TEST_STALL": "publish:0"})  # stops holding it
    try:
        for _ in range(3000):
            if (out / ".lock").is_file() and (out / ".lock").read_text().strip() or holder.poll() is not None:
                break
            time.sleep(0.05)
        assert holder.poll() is None, holder.stderr.read()
        second = runner.invoke(app, ["scan", str(store_path), "--mapper", str(mapper), "--out", str(out), "--force",
                                     "--quiet"])
        assert second.exit_code == 1
        assert f"being written by process {holder.pid}" in second.stderr and second.stderr.count("\n") == 1
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "summary.json").exists()
    third = runner.invoke(app, ["scan", str(store_path), "--mapper", str(mapper), "--out", str(out), "--quiet"])
    assert third.exit_code == 0, third.output
    assert (out / "summary.json").is_file() and not [p for p in out.iterdir() if p.name.startswith(".cfbd")]


def test_force_replaces_the_whole_scan(small, tmp_path):
    """--force replaces every file of the earlier scan: its report.html does not survive a scan without --report;
    files that are not a scan's stay."""
    store_path, mapper = small
    out = tmp_path / "o"
    args = ["scan", str(store_path), "--mapper", str(mapper), "--out", str(out), "--quiet"]
    assert runner.invoke(app, [*args, "--report"]).exit_code == 0
    (out / "notes.md").write_text("mine")
    assert (out / "report.html").is_file()
    refused = runner.invoke(app, [*args, "--method", "cosine"])
    assert refused.exit_code == 1 and "--force" in refused.stderr
    result = runner.invoke(app, [*args, "--method", "cosine", "--force", "--json"])
    assert result.exit_code == 0, result.output
    assert not (out / "report.html").exists() and (out / "notes.md").read_text() == "mine"
    written = json.loads((out / "summary.json").read_text())
    assert written["config"]["method"] == "cosine" and written == json.loads(result.stdout)


def _file_size_limit():
    """Writes past 200 kB fail as on a full disk (EFBIG instead of ENOSPC; the same OSError path)."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_a_full_disk_names_the_path_and_leaves_nothing(small, tmp_path):
    store_path, mapper = small
    out = tmp_path / "o"
    done = subprocess.run([sys.executable, "-m", "cfbd_fast.cli.main", "scan", str(store_path), "--mapper",
                           str(mapper), "--out", str(out), "--quiet"], capture_output=True, text=True,
                          preexec_fn=_file_size_limit, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                            "NUMBA_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert str(out) in done.stderr and "nothing was published" in done.stderr
    assert not out.exists()  # no temporary folder, no output, not even the folder the scan created
