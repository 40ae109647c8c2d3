"""The scan under torch.distributed (real torchrun processes, gloo on CPU) gives the single process's answer, on
one store and on shard stores; a killed rank fails the run with nothing published; the distributed order
statistics and Benjamini-Hochberg cut equal numpy's and the single-process ones on adversarial data."""
import json
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest

from cfbd_fast.demo import train_demo_mapper, write_demo_stores
from cfbd_fast.detect import threshold as single
from cfbd_fast.distributed import select, threshold as dthr
from cfbd_fast.distributed.comm import Comm
from cfbd_fast.mapper import save_mapper
from cfbd_fast.store import EmbeddingStore

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
OUTPUTS = ("scores.parquet", "poisoned.txt", "keep.txt", "invalid.txt", "keep.parquet", "flagged.csv",
           "summary.json")


# -- helpers ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args, ranks: int = 1, env=None, timeout: int = 240) -> subprocess.CompletedProcess:
    """`cfbd-fast ARGS` in one process, or under torchrun with `ranks` processes."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                "--master-addr", "127.0.0.1", "--master-port", str(_free_port())] if ranks > 1 else [sys.executable]
    return subprocess.run([*launcher, "-m", "cfbd_fast.cli.main", *map(str, args)], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=timeout)


def _assert_same_outputs(one, many):
    import pyarrow.csv as pacsv

    for read, name in ((pq.read_table, "scores.parquet"), (pacsv.read_csv, "flagged.csv")):
        a, b = read(one / name), read(many / name)
        assert a.column_names == b.column_names and a.num_rows == b.num_rows, name
        for col in a.column_names:
            x, y = a.column(col).to_pylist(), b.column(col).to_pylist()
            if col in ("row_id", "key", "caption", "subset", "verdict", "cluster"):
                assert x == y, f"{name}: {col}"
            else:  # scores to 1e-6 (p-values differ in the last bit at most: scipy's ndtr)
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
    """20k rows, 256 dims, 1% poisoned (the cluster verdict finds the backdoor), a mapper, and the same rows as
    three shard stores of unequal sizes."""
    out = tmp_path_factory.mktemp("dist")
    store, ref = write_demo_stores(out, rows=20_000, dim=256, poison_rate=0.01, seed=0, reference_rows=20_000,
                                   progress=False)
    mapper = save_mapper(train_demo_mapper(ref, seed=0), out / "mapper.safetensors")
    src = EmbeddingStore.open(store)
    (out / "parts").mkdir()
    for i, (lo, hi) in enumerate(((0, 5000), (5000, 13_000), (13_000, 20_000))):
        shard = EmbeddingStore.create(out / "parts" / f"part-{i}.cfbd", src.dim, dtype="float16", model=src.model,
                                      pretrained=src.pretrained, normalized=True)
        shard.append(image=np.asarray(src.image[lo:hi]), text=np.asarray(src.text[lo:hi]),
                     meta=src.meta.slice(lo, hi - lo))
        shard.close()
    return out, store, mapper


@pytest.fixture(scope="module")
def single_runs(demo):
    """The single-process scan's outputs per method."""
    out, store, mapper = demo
    runs = {}
    for method in ("cfbd", "cfbd-paper"):
        result = _cli("scan", store, "--mapper", mapper, "--method", method, "--out", out / f"one-{method}", "--quiet")
        assert result.returncode == 0, result.stderr
        runs[method] = out / f"one-{method}"
    return runs


# -- the scan across ranks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method,ranks", [("cfbd", 2), ("cfbd", 3), ("cfbd-paper", 3)])
def test_ranks_on_one_store_match_one_process(demo, single_runs, method, ranks):
    out, store, mapper = demo
    dest = out / f"ranks{ranks}-{method}"
    result = _cli("scan", store, "--mapper", mapper, "--method", method, "--out", dest, "--quiet", ranks=ranks)
    assert result.returncode == 0, result.stderr[-12000:]
    one, many = _assert_same_outputs(single_runs[method], dest)
    assert many["distributed"]["world_size"] == ranks
    assert sum(many["distributed"]["rows_per_rank"]) == 20_000
    assert one["counts"]["verdict"]["poisoned"] > 100  # the comparison is about a real detection
    assert not any(p.name.startswith(".cfbd-scan") for p in dest.iterdir())  # the temporary folder is gone


@pytest.mark.parametrize("ranks", [2, 3])
def test_shard_stores_match_one_store(demo, single_runs, ranks):
    """Three shards, round-robin over the ranks (with 2 ranks, rank 0 holds the first and last shard)."""
    out, store, mapper = demo
    dest = out / f"shards{ranks}"
    result = _cli("scan", "--shards", out / "parts" / "*.cfbd", "--mapper", mapper, "--out", dest, "--quiet",
                  ranks=ranks)
    assert result.returncode == 0, result.stderr[-12000:]
    _, many = _assert_same_outputs(single_runs["cfbd"], dest)
    assert len(many["store"]["shards"]) == 3


def _spawn(world, *args, env=None):
    """`cfbd-fast ARGS` as `world` ranks started by hand (the environment torchrun would set); their results."""
    base = {**ENV, **(env or {}), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, "-m", "cfbd_fast.cli.main", *map(str, args)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world)]
    return [(p.wait(timeout=240), p.stdout.read(), p.stderr.read()) for p in procs]


def test_killed_rank_fails_the_run_and_publishes_nothing(demo):
    out, store, mapper = demo
    dest = out / "killed"
    (code0, _, err0), (code1, _, _) = _spawn(2, "scan", store, "--mapper", mapper, "--out", dest, "--quiet",
                                             env={"CFBD_FAST_TEST_DIE": "correlation:1"})
    assert code1 == 17  # the process died where it was told to
    assert code0 == 1
    assert "rank 0 of 2" in err0 and "another rank died or timed out" in err0
    assert not dest.exists() or not any((dest / name).exists() for name in OUTPUTS)


def test_killed_rank_while_publishing(demo):
    """A rank that dies after the others have written their parts: still nothing published, no parts left."""
    out, store, mapper = demo
    dest = out / "killed-publish"
    (code0, _, err0), (code1, _, _) = _spawn(2, "scan", store, "--mapper", mapper, "--method", "cfbd-paper",
                                             "--out", dest, "--quiet", env={"CFBD_FAST_TEST_DIE": "publish:1"})
    assert (code0, code1) == (1, 17)
    assert "another rank died or timed out" in err0
    assert not any(dest.iterdir()) if dest.exists() else True


def test_methods_fitted_on_a_sample_are_refused(demo):
    out, store, mapper = demo
    result = _cli("scan", "--shards", out / "parts" / "*.cfbd", "--mapper", "self", "--out", out / "refused")
    assert result.returncode == 1
    assert "not supported by the distributed scan" in result.stderr


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
        p_want, null_want = single.null_pvalues(score, valid)
        reject_want, cut_want = single.benjamini_hochberg(p_want, 0.05)

        def run(comm, bounds):
            lo, hi = bounds
            p, null = dthr.null_pvalues(comm, score[lo:hi], valid[lo:hi])
            reject, cut = dthr.benjamini_hochberg(comm, p, 0.05)
            return p, null, reject, cut

        bounds = list(zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(score)]])))
        results = _on_ranks(world, bounds, run)
        p = np.concatenate([r[0] for r in results])
        assert all(r[1] == null_want for r in results)  # the null's location and scale: exactly
        # scipy's vectorised ndtr may round the last bit by an element's place in its array
        np.testing.assert_allclose(p, p_want, rtol=0, atol=1e-15)
        reject, cut = single.benjamini_hochberg(p, 0.05)  # the cut over all ranks is the one-array cut
        assert np.array_equal(np.concatenate([r[2] for r in results]), reject)
        assert all(r[3] == cut for r in results)
        assert np.array_equal(reject, reject_want)


# -- embed across ranks ---------------------------------------------------------------------------------------
def test_embed_ranks_write_one_shard_store_per_input_shard(tmp_path):
    """Two ranks share three .tar shards round-robin; the shard stores hold, in order, what one store holds."""
    from test_embed import TINY_MODEL, _write_shards

    _write_shards(tmp_path / "shards")
    flags = ["--model", TINY_MODEL, "--workers", "0", "--quiet"]
    one = _cli("embed", tmp_path / "shards", "--out", tmp_path / "one.cfbd", *flags)
    assert one.returncode == 0, one.stderr
    many = _cli("embed", tmp_path / "shards", "--out", tmp_path / "parts", *flags, "--json", ranks=2)
    assert many.returncode == 0, many.stderr[-6000:]
    report = json.loads(many.stdout[many.stdout.index("{"):])
    assert report["ranks"] == 2 and report["rows_written"] == 10
    parts = sorted((tmp_path / "parts").glob("*.cfbd"))
    assert [p.name for p in parts] == ["00000.cfbd", "00001.cfbd", "00002.cfbd"]
    with EmbeddingStore.open(tmp_path / "one.cfbd") as whole:
        keys = whole.meta.column("key").to_pylist()
        image, text = np.asarray(whole.image, dtype=np.float32), np.asarray(whole.text, dtype=np.float32)
    stores = [EmbeddingStore.open(p) for p in parts]
    assert sum((s.meta.column("key").to_pylist() for s in stores), []) == keys
    np.testing.assert_allclose(np.concatenate([np.asarray(s.image, dtype=np.float32) for s in stores]), image,
                               atol=2e-3)
    np.testing.assert_allclose(np.concatenate([np.asarray(s.text, dtype=np.float32) for s in stores]), text,
                               atol=2e-3)


def test_distributed_without_a_launcher_says_how_to_start(demo, monkeypatch):
    from typer.testing import CliRunner

    from cfbd_fast.cli.main import app

    out, store, mapper = demo
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(app, ["scan", str(store), "--mapper", str(mapper), "--distributed",
                                      "--out", str(out / "no-launcher"), "--quiet"])
    assert result.exit_code == 1
    assert "torchrun --nproc-per-node N" in result.output


def test_stalled_rank_times_the_run_out(demo):
    """A rank that hangs: the others give up after --timeout with a clear error and publish nothing."""
    out, store, mapper = demo
    dest = out / "stalled"
    base = {**ENV, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
            "CFBD_FAST_TEST_STALL": "gmm:1"}
    args = [sys.executable, "-m", "cfbd_fast.cli.main", "scan", str(store), "--mapper", str(mapper), "--out",
            str(dest), "--quiet", "--timeout", "10"]
    procs = [subprocess.Popen(args, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    try:
        code0 = procs[0].wait(timeout=180)
        err0 = procs[0].stderr.read()
    finally:
        procs[1].kill()
        procs[1].wait()
    assert code0 == 1
    assert "another rank died or timed out" in err0
    assert not dest.exists() or not any((dest / name).exists() for name in OUTPUTS)
