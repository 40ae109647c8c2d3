"""The scan under torch.distributed (real torchrun processes, gloo on CPU) gives the single process's answer, on
one store and on shard stores, with a mapper file, kNN and self-fitted mappers; a killed or stalled rank fails
the run with nothing published; the distributed order statistics and Benjamini-Hochberg cut equal numpy's and the
single-process ones on adversarial data.

Each torchrun launch runs several commands (tests/cli_commands.py), and the failing runs start together, so that
the file pays for few process starts."""
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cfbd_fast.demo import train_demo_mapper, write_demo_stores
from cfbd_fast.detect import threshold
from cfbd_fast.distributed import select
from cfbd_fast.distributed.comm import Comm
from cfbd_fast.mapper import save_mapper
from cfbd_fast.store import EmbeddingStore

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
OUTPUTS = ("scores.parquet", "poisoned.txt", "keep.txt", "invalid.txt", "keep.parquet", "flagged.csv",
           "summary.json")
COMMANDS = Path(__file__).parent / "cli_commands.py"
ROWS = 12_000


# -- helpers ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(commands, ranks: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """`cfbd-fast` commands (argument lists) one after the other, in one process or in each of `ranks` processes
    of one torchrun launch."""
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr", "127.0.0.1",
                "--master-port", str(_free_port())] if ranks > 1 else []
    return subprocess.run([sys.executable, *launcher, str(COMMANDS), json.dumps([list(map(str, c)) for c in commands])],
                          capture_output=True, text=True, env=ENV, timeout=timeout)


def _spawn(world, *args, env=None):
    """`cfbd-fast ARGS` as `world` ranks started by hand (the environment torchrun would set), not waited for."""
    base = {**ENV, **(env or {}), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port())}
    return [subprocess.Popen([sys.executable, "-m", "cfbd_fast.cli.main", *map(str, args)], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world)]


def _assert_same_outputs(one, many):
    import pyarrow.csv as pacsv

    for read, name in ((pq.read_table, "scores.parquet"), (pacsv.read_csv, "flagged.csv")):
        a, b = read(one / name), read(many / name)
        assert a.column_names == b.column_names and a.num_rows == b.num_rows, name
        for col in a.column_names:
            x, y = a.column(col).to_pylist(), b.column(col).to_pylist()
            if col in ("row_id", "key", "caption", "subset", "verdict", "cluster"):
                assert x == y, f"{name}: {col}"
            else:  # scores to 1e-6
                np.testing.assert_allclose(np.array(x, dtype=float), np.array(y, dtype=float), rtol=0, atol=1e-6,
                                           equal_nan=True, err_msg=f"{name}: {col}")
    for name in ("poisoned.txt", "keep.txt", "invalid.txt"):
        assert (one / name).read_text() == (many / name).read_text(), name
    assert pq.read_table(one / "keep.parquet").equals(pq.read_table(many / "keep.parquet"))
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (one, many))
    for key in ("counts", "seeds", "cluster", "clusters", "metrics"):
        assert sa.get(key) == sb.get(key), key
    return sa, sb


# -- inputs ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """12k rows, 256 dims, 2% poisoned (the cluster verdict finds the backdoor), a mapper, and the same rows as
    three shard stores of unequal sizes."""
    out = tmp_path_factory.mktemp("dist")
    store, ref = write_demo_stores(out, rows=ROWS, dim=256, poison_rate=0.02, seed=0, reference_rows=12_000,
                                   progress=False)
    mapper = save_mapper(train_demo_mapper(ref, seed=0), out / "mapper.safetensors")
    src = EmbeddingStore.open(store)
    (out / "parts").mkdir()
    for i, (lo, hi) in enumerate(((0, 3000), (3000, 8000), (8000, ROWS))):
        shard = EmbeddingStore.create(out / "parts" / f"part-{i}.cfbd", src.dim, dtype="float16", model=src.model,
                                      pretrained=src.pretrained, normalized=True)
        shard.append(image=np.asarray(src.image[lo:hi]), text=np.asarray(src.text[lo:hi]),
                     meta=src.meta.slice(lo, hi - lo))
        shard.close()
    return out, store, mapper


@pytest.fixture(scope="module")
def runs(demo):
    """Every successful run, one launch per number of ranks: one process scans the store with cfbd and
    cfbd-paper; 2 ranks scan the store and the shards with cfbd and embed .tar shards; 3 ranks scan the store
    with cfbd and cfbd-paper and the shards with cfbd. Each launch's outputs by name."""
    from test_embed import TINY_MODEL, _write_shards

    out, store, mapper = demo
    _write_shards(out / "tars")
    embed = ["embed", out / "tars", "--model", TINY_MODEL, "--workers", "0", "--quiet"]

    def scan(method, dest, *data, mapper=mapper):
        return ["scan", *(data or (store,)), "--mapper", mapper, "--method", method, "--out", out / dest, "--quiet"]

    shards = ("--shards", out / "parts" / "*.cfbd")
    launches = {
        1: [scan("cfbd", "one-cfbd"), scan("cfbd-paper", "one-cfbd-paper"), [*embed, "--out", out / "one.cfbd"],
            scan("cfbd", "one-knn", mapper="knn"), scan("cfbd", "one-self", mapper="self"),
            scan("cfbd", "one-shards-self", *shards, mapper="self")],
        2: [[*embed, "--out", out / "tar-parts", "--json"], [*scan("cfbd", "ranks2-cfbd"), "--report"],
            scan("cfbd", "shards2", *shards), scan("cfbd", "ranks2-knn", mapper="knn"),
            scan("cfbd", "shards2-self", *shards, mapper="self")],
        3: [scan("cfbd", "ranks3-cfbd"), scan("cfbd-paper", "ranks3-cfbd-paper"), scan("cfbd", "shards3", *shards)],
    }
    results = {}
    for ranks, commands in launches.items():
        result = _launch(commands, ranks=ranks)
        assert result.returncode == 0, result.stderr[-12000:]
        results[ranks] = result
    return out, results


# -- the scan across ranks ----------------------------------------------------------------------------------
def test_report_under_ranks(runs):
    """scan --report under torchrun: rank 0 writes report.html before the commit and the summary names it."""
    out, _ = runs
    summary = json.loads((out / "ranks2-cfbd" / "summary.json").read_text())
    assert summary["report"] == str(out / "ranks2-cfbd" / "report.html")
    assert "BACKDOOR" in (out / "ranks2-cfbd" / "report.html").read_text()


@pytest.mark.parametrize("method,ranks", [("cfbd", 2), ("cfbd", 3), ("cfbd-paper", 3)])
def test_ranks_on_one_store_match_one_process(runs, method, ranks):
    out, _ = runs
    dest = out / f"ranks{ranks}-{method}"
    one, many = _assert_same_outputs(out / f"one-{method}", dest)
    assert many["distributed"]["world_size"] == ranks
    assert sum(many["distributed"]["rows_per_rank"]) == ROWS
    assert one["counts"]["verdict"]["poisoned"] > 100  # the comparison is about a real detection
    if method == "cfbd":
        assert one["cluster"]["found"]
    assert not any(p.name.startswith(".cfbd-scan") for p in dest.iterdir())  # the temporary folder is gone
    assert (dest / "scores.parquet").is_dir() and (dest / "keep.parquet").is_dir()  # parts, one per rank


@pytest.mark.parametrize("mapper,one,many", [("knn", "one-knn", "ranks2-knn"), ("self", "one-self", "shards2-self"),
                                             ("self", "one-self", "one-shards-self")])
def test_mappers_fitted_on_a_sample_under_every_route(runs, mapper, one, many):
    """--mapper knn and self are fitted on a sample of all rows gathered by the global steps: ranks and shards
    give the one-process answer."""
    out, _ = runs
    a, b = _assert_same_outputs(out / one, out / many)
    assert a["mapper"] == b["mapper"] and a["mapper"].startswith(f"{mapper}:")


@pytest.mark.parametrize("ranks", [2, 3])
def test_shard_stores_match_one_store(runs, ranks):
    """Three shards, round-robin over the ranks (with 2 ranks, rank 0 holds the first and last shard)."""
    out, _ = runs
    _, many = _assert_same_outputs(out / "one-cfbd", out / f"shards{ranks}")
    assert len(many["store"]["shards"]) == 3


def test_embed_ranks_write_one_shard_store_per_input_shard(runs):
    """Two ranks share three .tar shards round-robin; the shard stores hold, in order, what one store holds."""
    out, results = runs
    stdout = results[2].stdout
    report, _ = json.JSONDecoder().raw_decode(stdout[stdout.index("{"):])
    assert report["ranks"] == 2 and report["rows_written"] == 10
    parts = sorted((out / "tar-parts").glob("*.cfbd"))
    assert [p.name for p in parts] == ["00000.cfbd", "00001.cfbd", "00002.cfbd"]
    with EmbeddingStore.open(out / "one.cfbd") as whole:
        keys = whole.meta.column("key").to_pylist()
        image, text = np.asarray(whole.image, dtype=np.float32), np.asarray(whole.text, dtype=np.float32)
    stores = [EmbeddingStore.open(p) for p in parts]
    assert sum((s.meta.column("key").to_pylist() for s in stores), []) == keys
    np.testing.assert_allclose(np.concatenate([np.asarray(s.image, dtype=np.float32) for s in stores]), image,
                               atol=2e-3)
    np.testing.assert_allclose(np.concatenate([np.asarray(s.text, dtype=np.float32) for s in stores]), text,
                               atol=2e-3)


# -- ranks that fail ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def failed_runs(demo):
    """Three runs of 2 ranks started together: rank 1 killed before pass 2, rank 1 killed while publishing,
    rank 1 stalled before the GMM (the others give up after --timeout 10). Each run's (code, stderr) per rank."""
    out, store, mapper = demo
    runs = {
        "killed": _spawn(2, "scan", store, "--mapper", mapper, "--out", out / "killed", "--quiet",
                         env={"CFBD_FAST_TEST_DIE": "correlation:1"}),
        "killed-publish": _spawn(2, "scan", store, "--mapper", mapper, "--method", "cfbd-paper", "--out",
                                 out / "killed-publish", "--quiet", env={"CFBD_FAST_TEST_DIE": "publish:1"}),
        "stalled": _spawn(2, "scan", store, "--mapper", mapper, "--out", out / "stalled", "--quiet", "--timeout", "10",
                          env={"CFBD_FAST_TEST_STALL": "gmm:1"}),
    }
    results = {}
    try:
        for name, (rank0, rank1) in runs.items():
            code0 = rank0.wait(timeout=300)
            if name == "stalled":
                rank1.kill()  # it would sleep for an hour
            results[name] = [(code0, rank0.stderr.read()), (rank1.wait(timeout=60), rank1.stderr.read())]
    finally:
        for procs in runs.values():
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return out, results


def _nothing_published(dest):
    return not dest.exists() or not any((dest / name).exists() for name in OUTPUTS)


def test_killed_rank_fails_the_run_and_publishes_nothing(failed_runs):
    out, results = failed_runs
    (code0, err0), (code1, _) = results["killed"]
    assert code1 == 17  # the process died where it was told to
    assert code0 == 1
    assert "rank 0 of 2" in err0 and "another rank died or timed out" in err0
    assert _nothing_published(out / "killed")


def test_killed_rank_while_publishing(failed_runs):
    """A rank that dies after the others have written their parts: still nothing published, no parts left."""
    out, results = failed_runs
    (code0, err0), (code1, _) = results["killed-publish"]
    assert (code0, code1) == (1, 17)
    assert "another rank died or timed out" in err0
    dest = out / "killed-publish"
    assert not [p.name for p in dest.iterdir() if p.name != ".lock"] if dest.exists() else True


def test_stalled_rank_times_the_run_out(failed_runs):
    """A rank that hangs: the others give up after --timeout with a clear error and publish nothing."""
    out, results = failed_runs
    (code0, err0), _ = results["stalled"]
    assert code0 == 1
    assert "another rank died or timed out" in err0
    assert _nothing_published(out / "stalled")


# -- refused options --------------------------------------------------------------------------------------------
def _invoke(*args, monkeypatch):
    """`cfbd-fast ARGS` in this process, with no launcher's environment."""
    from typer.testing import CliRunner

    from cfbd_fast.cli.main import app

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    return CliRunner().invoke(app, list(map(str, args)))


def test_distributed_without_a_launcher_says_how_to_start(demo, monkeypatch):
    out, store, mapper = demo
    result = _invoke("scan", store, "--mapper", mapper, "--distributed", "--out", out / "no-launcher", "--quiet",
                     monkeypatch=monkeypatch)
    assert result.exit_code == 1
    assert "torchrun --nproc-per-node N" in result.output


# -- exact order statistics and cuts across ranks (threads standing in for ranks) ---------------------------
class _Group:
    def __init__(self, world):
        self.world, self.slots, self.barrier = world, [None] * world, threading.Barrier(world)


class _ThreadComm(Comm):
    """Ranks as threads of one process: the same collectives' semantics as TorchComm."""

    def __init__(self, group, rank):
        self.group, self.rank, self.world = group, rank, group.world

    def _exchange(self, obj):
        self.group.slots[self.rank] = obj
        self.group.barrier.wait()
        out = list(self.group.slots)
        self.group.barrier.wait()
        return out

    def _cast(self, array):
        a = np.asarray(array)
        return a.astype(np.float64) if a.dtype.kind == "f" else a.astype(np.int64)

    def sum(self, array, op=""):
        return np.sum(np.stack(self._exchange(self._cast(array))), axis=0)

    def max(self, array, op=""):
        return np.max(np.stack(self._exchange(self._cast(array))), axis=0)

    def min(self, array, op=""):
        return np.min(np.stack(self._exchange(self._cast(array))), axis=0)

    def gather_objects(self, obj, op=""):
        return self._exchange(obj)


def _on_ranks(world, pieces, fn):
    group, results, errors = _Group(world), [None] * world, []

    def run(rank):
        try:
            results[rank] = fn(_ThreadComm(group, rank), pieces[rank])
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _adversarial(rng, dtype):
    kind = rng.integers(4)
    n = int(rng.integers(1, 400))
    if kind == 0:  # few distinct values: long runs of ties
        return rng.choice(np.array([-0.0, 0.0, 1.5, -2.25, 1e-30, -1e30, 3.0], dtype=dtype), n)
    if kind == 1:  # one value
        return np.full(n, dtype(0.7))
    if kind == 2:  # duplicates of a normal sample, extremes
        x = rng.normal(size=n).astype(dtype)
        return np.concatenate([x, x[: n // 2], [np.finfo(dtype).max, np.finfo(dtype).min]]).astype(dtype)
    return rng.normal(size=n).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_distributed_selection_equals_numpy(dtype):
    rng = np.random.default_rng(7)
    for trial in range(40):
        x = _adversarial(rng, dtype)
        world = int(rng.integers(1, 5))
        cuts = np.sort(rng.integers(0, len(x) + 1, size=world - 1))
        pieces = np.split(x, cuts)  # some ranks may hold nothing

        def stats(comm, piece):
            return (select.median(comm, piece), select.quantile(comm, piece, 0.95),
                    select.quantile(comm, piece, 0.05), select.quantile(comm, piece, 0.999, "higher"),
                    select.kth_smallest(comm, piece, len(x) // 3))

        want = (np.median(x), np.quantile(x, 0.95), np.quantile(x, 0.05), np.quantile(x, 0.999, method="higher"),
                np.sort(x)[len(x) // 3])
        for got in _on_ranks(world, pieces, stats):
            assert [float(g) for g in got] == [float(w) for w in want], (trial, world)
            assert np.asarray(got[0]).dtype == np.median(x).dtype


def test_distributed_fdr_and_null_equal_the_single_process():
    rng = np.random.default_rng(3)
    for trial in range(30):
        n = int(rng.integers(5, 3000))
        score = np.concatenate([rng.normal(size=n), rng.normal(4, 0.5, size=int(rng.integers(0, 60)))])
        score = np.round(score, int(rng.integers(1, 4))).astype(np.float32)  # ties
        score[rng.random(len(score)) < 0.02] = np.nan
        valid = np.isfinite(score) | (rng.random(len(score)) < 0.5)
        world = int(rng.integers(1, 4))
        cuts = np.sort(rng.integers(0, len(score) + 1, size=world - 1))
        p_want, null_want = threshold.null_pvalues(score, valid)
        reject_want, cut_want = threshold.benjamini_hochberg(p_want, 0.05)

        def run(comm, bounds):
            lo, hi = bounds
            p, null = threshold.null_pvalues(score[lo:hi], valid[lo:hi], comm=comm)
            reject, cut = threshold.benjamini_hochberg(p, 0.05, comm=comm)
            return p, null, reject, cut

        bounds = list(zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(score)]])))
        results = _on_ranks(world, bounds, run)
        p = np.concatenate([r[0] for r in results])
        assert all(r[1] == null_want for r in results)  # the null's location and scale: exactly
        # a vectorised erfc may round the last bit by an element's place in its array
        np.testing.assert_allclose(p, p_want, rtol=0, atol=1e-15)
        reject, cut = threshold.benjamini_hochberg(p, 0.05)  # the cut over all ranks is the one-array cut
        assert np.array_equal(np.concatenate([r[2] for r in results]), reject)
        assert all(r[3] == cut for r in results)
        assert np.array_equal(reject, reject_want)
