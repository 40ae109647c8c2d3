"""Many writers at once: one holds a store's writer lock, the others refuse in one line naming its pid; a store
is never left corrupt; a killed holder's lock is released by the operating system and the next writer resumes.

Two racer processes are started once and then released together for every round (one line on stdin each), so
that 20 rounds cost the start-up of Python and torch once rather than 40 times.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from typer.testing import CliRunner

from cfbd_fast.cli.main import app
from cfbd_fast.embed import TINY_MODEL
from cfbd_fast.store import EmbeddingStore
from test_embed import _write_csv_dataset

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 20
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
EMBED_FLAGS = ["--model", TINY_MODEL, "--batch-size", "4", "--commit-rows", "4", "--workers", "0", "--quiet",
               "--device", "cpu"]
BUSY = re.compile(r"^Error: store (\S+) is being written by process (\d+); wait for it or stop it$")

# Imports, says "ready", then reads one JSON list of CLI arguments per line on stdin, runs it in-process and
# prints {"code", "stderr"}.
RACER = textwrap.dedent("""
    import contextlib, io, json, sys
    import cfbd_fast.embed.runner, open_clip, torch  # the heavy imports, once, before the first round
    from cfbd_fast.cli.main import app
    print("ready", flush=True)
    for line in sys.stdin:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = app(json.loads(line), standalone_mode=False, prog_name="cfbd-fast") or 0
            except SystemExit as exc:
                code = exc.code
        print(json.dumps({"code": code, "stderr": err.getvalue()}), flush=True)
""")


def _check_whole(path: Path) -> int:
    """Open the store and read every committed byte (parts are checked against their CRCs); its row count."""
    with EmbeddingStore.open(path) as store:
        assert store.meta.num_rows == len(store)
        store.skipped
        assert sum(len(chunk) for chunk in store.iter_chunks(rows=5)) == len(store)
        return len(store)


class Racers:
    """Two CLI processes that run one command each per round, released at the same moment."""

    def __init__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", RACER], env=ENV, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(2)]
        for proc in self.procs:
            assert proc.stdout.readline().strip() == "ready"

    def race(self, commands: list[list[str]]) -> list[dict]:
        for proc, command in zip(self.procs, commands):
            proc.stdin.write(json.dumps(command) + "\n")
        for proc in self.procs:
            proc.stdin.flush()
        return [json.loads(proc.stdout.readline()) for proc in self.procs]

    def close(self):
        for proc in self.procs:
            proc.stdin.close()
            proc.wait(timeout=60)


@pytest.fixture(scope="module")
def racers():
    pool = Racers()
    yield pool
    pool.close()


def _check_outcome(results: list[dict], racers: Racers, store: Path) -> int:
    """Each writer either finished or refused in one line naming the other's pid; returns the number refused."""
    refused = 0
    for result, other in zip(results, reversed(racers.procs)):
        if result["code"] == 0:
            continue
        assert result["code"] == 1, result
        lines = result["stderr"].strip().splitlines()
        assert len(lines) == 1, result["stderr"]
        match = BUSY.match(lines[0])
        assert match and int(match.group(2)) == other.pid and Path(match.group(1)) == store, lines[0]
        refused += 1
    assert refused < 2, results
    return refused


@pytest.mark.slow
def test_two_embeds_into_one_store(tmp_path, racers):
    csv = _write_csv_dataset(tmp_path / "data", 24, bad=False)
    refused = 0
    for round_ in range(ROUNDS):
        store = tmp_path / f"r{round_}.cfbd"
        command = ["embed", str(csv), "--out", str(store), *EMBED_FLAGS]
        refused += _check_outcome(racers.race([command, command]), racers, store)
        assert _check_whole(store) == 24
        assert sorted(p.name for p in store.iterdir() if p.name.endswith(".tmp")) == []
    assert refused > 0, "no round had two writers at once: the test raced nothing"


@pytest.mark.slow
def test_two_appends_into_one_store(tmp_path, racers):
    first, second, third = (_write_csv_dataset(tmp_path / name, 12, bad=False, seed=seed)
                            for name, seed in (("a", 0), ("b", 100), ("c", 200)))
    base = tmp_path / "base.cfbd"
    assert racers.race([["embed", str(first), "--out", str(base), *EMBED_FLAGS], ["--version"]])[0]["code"] == 0
    refused = 0
    for round_ in range(ROUNDS):
        store = tmp_path / f"r{round_}.cfbd"
        shutil.copytree(base, store)
        commands = [["embed", str(csv), "--out", str(store), "--append", *EMBED_FLAGS] for csv in (second, third)]
        results = racers.race(commands)
        lost = _check_outcome(results, racers, store)
        refused += lost
        assert _check_whole(store) == 36 - 12 * lost
        with EmbeddingStore.open(store) as opened:
            things = [int(c.split()[4].rstrip(",")) for c in opened.meta.column("caption").to_pylist()]
        blocks = [things[i:i + 12] for i in range(0, len(things), 12)]  # each input's rows stay whole, in order
        assert blocks[0] == list(range(12)) and all(b in (list(range(100, 112)), list(range(200, 212)))
                                                    for b in blocks[1:]) and len({b[0] for b in blocks}) == len(blocks)
    assert refused > 0, "no round had two writers at once: the test raced nothing"


@pytest.mark.slow
def test_a_killed_holder_releases_the_lock_and_the_next_writer_resumes(tmp_path, racers):
    csv = _write_csv_dataset(tmp_path / "data", 320, bad=False)
    store = tmp_path / "killed.cfbd"
    args = ["embed", str(csv), "--out", str(store), "--model", TINY_MODEL, "--batch-size", "4", "--commit-rows", "8",
            "--workers", "1", "--quiet", "--device", "cpu"]
    holder = subprocess.Popen([sys.executable, "-m", "cfbd_fast.cli.main", *args], env=ENV, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        rows, deadline = 0, time.monotonic() + 120
        while rows < 16 and time.monotonic() < deadline and holder.poll() is None:
            try:
                rows = json.loads((store / "store.json").read_text())["rows"]
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.01)
        second = racers.race([args, ["--version"]])[0]  # a writer already started: it tries at once
        assert holder.poll() is None, f"embed ended before it could be killed: {holder.stderr.read().decode()}"
        assert second["code"] == 1 and second["stderr"].strip().splitlines() == [
            f"Error: store {store} is being written by process {holder.pid}; wait for it or stop it"]

        os.kill(holder.pid, signal.SIGKILL)  # the main process only: its loader worker must not keep the lock
        holder.wait()
        with EmbeddingStore.open(store) as opened:
            finished, done, total = opened.completion
            assert not finished and total == 320 and done == len(opened) and 16 <= done < 320
        info = CliRunner().invoke(app, ["store", "info", str(store), "--no-health"])
        assert (f"status       incomplete: embedding stopped at row {done} of 320 (rerun the same command to resume)"
                in info.stdout.splitlines()), info.stdout
        _scan_refuses_an_incomplete_store_unless_allowed(store, done, tmp_path / "partial.scan")
        resumed = racers.race([[*args, "--json"], ["--version"]])[0]
        assert resumed["code"] == 0, resumed["stderr"]
        with EmbeddingStore.open(store) as opened:
            embed = opened.record["embed"]
        assert embed["position"] == [1, 0] and _check_whole(store) == 320
        with EmbeddingStore.open(store) as opened:
            assert opened.completion == (True, 320, 320)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(holder.pid, signal.SIGKILL)  # and any worker left behind
        holder.stderr.close()


def _scan_refuses_an_incomplete_store_unless_allowed(store: Path, done: int, out: Path) -> None:
    """A store whose embed was killed: scan refuses it in one line leaving nothing; with --allow-incomplete it
    scans the rows embedded so far and says so in summary.json."""
    scan = ["scan", str(store), "--method", "cosine", "--out", str(out), "--quiet"]
    refused = CliRunner().invoke(app, scan)
    assert refused.exit_code == 1 and refused.stderr.strip().splitlines() == [
        f"Error: {store}: incomplete: its embedding stopped at input {done:,} of 320 ({done:,} rows embedded): rerun "
        "the same embed command to finish it, or scan with --allow-incomplete"], refused.stderr
    assert not out.exists()
    allowed = CliRunner().invoke(app, [*scan, "--allow-incomplete", "--json"])
    assert allowed.exit_code == 0, allowed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["store"]["complete"] is False and summary["config"]["allow_incomplete"] is True
    assert f"{store}: incomplete: its embedding stopped at input {done:,} of 320 ({done:,} rows embedded): the " \
           "outputs cover only the rows embedded so far" in summary["warnings"]
    assert sum(len((out / name).read_text().split()) for name in ("keep.txt", "poisoned.txt", "invalid.txt")) == done
    shutil.rmtree(out)


# ---- scan / scan: two scans with the same --out (the scan's output-folder lock) ----------------------------
SCAN_BUSY = re.compile(r"^Error: scan output folder (\S+) is being written by process (\d+); wait for it or stop it$")


@pytest.mark.slow
def test_two_scans_into_one_output_folder(tmp_path, racers):
    """Two scans of one --out released together: one publishes, the other refuses in one line (naming the
    holder's pid while it runs, or the finished scan's outputs after); the folder holds the winner's scan."""
    from cfbd_fast.demo import generate_pairs

    pairs = generate_pairs(rows=400, dim=8, poison_rate=0.01, seed=1, concepts=20)
    store = EmbeddingStore.from_arrays(tmp_path / "small.cfbd", image=pairs.image, text=pairs.text, meta=pairs.meta(),
                                       model="cfbd-fast-demo")
    store.close()
    busy = 0
    for round_ in range(ROUNDS):
        out = tmp_path / f"r{round_}.scan"
        commands = [["scan", str(tmp_path / "small.cfbd"), "--method", "cosine", "--out", str(out), "--quiet",
                     "--fpr", fpr] for fpr in ("0.01", "0.02")]
        results = racers.race(commands)
        assert sorted(r["code"] for r in results) == [0, 1], results
        winner = [r["code"] for r in results].index(0)
        lines = results[1 - winner]["stderr"].strip().splitlines()
        assert len(lines) == 1, results
        match = SCAN_BUSY.match(lines[0])
        if match:
            assert Path(match.group(1)) == out and int(match.group(2)) == racers.procs[winner].pid, lines[0]
            busy += 1
        else:
            assert lines[0] == f"Error: --out {out} already holds scan outputs: pass --force to replace them or " \
                               "choose another folder", lines[0]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["config"]["fpr"] == float(commands[winner][-1])  # the winner's scan, never replaced
        assert sorted(p.name for p in out.iterdir()) == sorted([".lock", "flagged.csv", "invalid.txt", "keep.parquet",
                                                                "keep.txt", "poisoned.txt", "scores.parquet",
                                                                "summary.json"])
    assert busy > 0, "no round had two scans at once: the test raced nothing"
