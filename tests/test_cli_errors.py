"""Every bad input to embed, store, report and explain ends in exit code 1 and one line: no traceback, nothing
left behind. Each case runs the real CLI in a subprocess."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from cfbd_fast.demo import write_demo_stores
from cfbd_fast.embed import TINY_MODEL
from test_embed import _write_csv_dataset

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
HUGE = "99999999999999999999"


def _fails(args: list[str], cwd: Path, env: dict | None = None) -> str:
    """Run `cfbd-fast ARGS` in CWD; assert exit 1, exactly one line on stderr, nothing on stdout. The line."""
    before = sorted(p.relative_to(cwd) for p in cwd.rglob("*"))
    proc = subprocess.run([sys.executable, "-m", "cfbd_fast.cli.main", *args], cwd=cwd, env=env or ENV,
                          capture_output=True, text=True, timeout=600)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and proc.stdout == "", (args, proc.returncode, proc.stderr)
    assert lines[0].startswith("Error: ") and "Traceback" not in proc.stderr
    assert sorted(p.relative_to(cwd) for p in cwd.rglob("*")) == before, f"{args} left files behind"
    return lines[0]


EMBED_CASES = {
    ("--batch-size", "0"): "Error: --batch-size 0: give a whole number from 1 to 65,536",
    ("--batch-size", HUGE): f"Error: --batch-size {HUGE}: give a whole number from 1 to 65,536",
    ("--commit-rows", "-3"): "Error: --commit-rows -3: give a whole number from 1 to 16,777,216",
    ("--commit-rows", HUGE): f"Error: --commit-rows {HUGE}: give a whole number from 1 to 16,777,216",
    ("--workers", "-1"): "Error: --workers -1: give a whole number from 0 to 256",
    ("--workers", HUGE): f"Error: --workers {HUGE}: give a whole number from 0 to 256",
}


@pytest.mark.slow
@pytest.mark.parametrize("option", list(EMBED_CASES), ids=lambda o: " ".join(o))
def test_embed_numeric_options_are_bounded(tmp_path, option):
    _write_csv_dataset(tmp_path, 2, bad=False)
    args = ["embed", "data.csv", "--out", "out.cfbd", "--model", TINY_MODEL, "--quiet", *option]
    assert _fails(args, tmp_path) == EMBED_CASES[option]


@pytest.mark.slow
def test_embed_offline_fails_in_one_attempt(tmp_path):
    """An unreachable hub and an empty cache: one line of advice, no retries in between."""
    _write_csv_dataset(tmp_path, 2, bad=False)
    env = {**ENV, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    (tmp_path / "hf").mkdir()
    (tmp_path / "cache").mkdir()
    line = _fails(["embed", "data.csv", "--out", "out.cfbd", "--model", "ViT-B-32", "--pretrained", "openai",
                   "--quiet", "--workers", "0"], tmp_path, env)
    assert line == ("Error: cannot download the openai weights of ViT-B-32 (no network?): run once with network "
                    "access (open_clip caches them) or pass a local checkpoint with --pretrained PATH")


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory) -> Path:
    store, _ = write_demo_stores(tmp_path_factory.mktemp("store"), rows=2000, dim=16, poison_rate=0.01, seed=3,
                                 reference_rows=500, progress=False)
    return store


@pytest.fixture(scope="module")
def scan_dir(demo_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scan") / "out"
    proc = subprocess.run([sys.executable, "-m", "cfbd_fast.cli.main", "scan", str(demo_store), "--mapper", "self",
                           "--out", str(out), "--quiet"], env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out


SCAN_CASES = {
    ("--random-seed", "-5"): "Error: random_seed (--random-seed) must be a whole number from 0 to 4,294,967,295, "
                             "got -5",
    ("--threads", HUGE): f"Error: threads (--threads) must be a whole number from 1 to 4,096, got {HUGE}",
    ("--chunk-rows", HUGE): f"Error: chunk_rows (--chunk-rows) must be a whole number from 1 to 16,777,216, got {HUGE}",
    ("--components", HUGE): f"Error: components (--components) must be a whole number from 1 to 100, got {HUGE}",
    ("--mapper", "knn", "--knn-neighbours", "100000000"): (
        "Error: knn_neighbours (--knn-neighbours) must be below knn_bank (20,000), the captions the neighbours are "
        "chosen from; got 100000000"),
    ("--timeout", "-1"): "Error: --timeout -1: give the seconds a rank waits, more than 0 and at most 604,800 "
                         "(a week)",
    ("--q", "5000"): "Error: seed_set_size (--seed-set-size) 5000 is larger than the store (2000 rows): lower it",
}


@pytest.mark.slow
@pytest.mark.parametrize("option", list(SCAN_CASES), ids=lambda o: " ".join(o))
def test_scan_numeric_options_are_bounded(demo_store, tmp_path, option):
    """Refused with one line, and the output folder (created by the scan or not) is not left behind."""
    args = ["scan", str(demo_store), "--mapper", "self", "--out", "out", "--quiet", *option]
    assert _fails(args, tmp_path) == SCAN_CASES[option]


@pytest.mark.slow
def test_scan_out_inside_a_store_is_refused(demo_store, tmp_path):
    store = tmp_path / demo_store.name
    shutil.copytree(demo_store, store)
    for out in (store, store / "meta"):
        assert _fails(["scan", str(store), "--mapper", "self", "--out", str(out), "--quiet"], tmp_path) == \
            f"Error: --out {out} is inside a store: give a folder outside the store for the scan's outputs"


@pytest.mark.slow
def test_a_given_threshold_is_shown_as_given(demo_store, tmp_path):
    """--threshold 0.5: the summary line and the report show 0.5, not nan or a dash."""
    proc = subprocess.run([sys.executable, "-m", "cfbd_fast.cli.main", "scan", str(demo_store), "--mapper", "self",
                           "--out", str(tmp_path / "out"), "--threshold", "0.5", "--report"], env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    verdicts = next(line for line in proc.stdout.splitlines() if line.startswith("verdicts"))
    assert verdicts.endswith("(threshold 0.5 on z-so, given)"), verdicts
    assert "given: 0.5 on z-so" in (tmp_path / "out" / "report.html").read_text()


def test_scan_memory_is_checked_before_allocating():
    """The memory the options ask for is compared with the free memory, naming the option that asks most."""
    from cfbd_fast.errors import InputError
    from cfbd_fast.pipeline.options import ScanConfig, check_memory, memory_needed

    cfg = ScanConfig(chunk_rows=2**24, knn_bank=1_000_000, knn_neighbours=999_999).validated()
    need = memory_needed(cfg, 10**8, 1024, "knn")
    assert need["chunk_rows"] == 8 * 2**24 * 1024 * 4 and need["knn_bank"] > 2 * 10**6 * 1024 * 4
    assert need["knn_neighbours"] == 999_999 * (1024 * 4 + 8)  # one query at a time: never 2,048 queries' 8 TiB
    check_memory(cfg, 10**8, 1024, "knn", sum(need.values()))  # exactly enough
    with pytest.raises(InputError, match=r"^chunk_rows \(--chunk-rows\) 16,777,216: the scan would allocate about "
                                         r"523\.5 GiB at once \(100,000,000 rows of dim 1024\), more than the "
                                         r"1\.0 GiB free on cpu: lower it$"):
        check_memory(cfg, 10**8, 1024, "knn", 2**30)
    small = ScanConfig().validated()
    check_memory(small, 2000, 16, "self", 2**30)
    with pytest.raises(InputError, match="^self_sample"):
        check_memory(replace(small, self_sample=2**28), 10**9, 4096, "self", 2**30 * 64)


def _broken_copy(scan_dir: Path, tmp_path: Path, name: str, data: bytes) -> Path:
    copy = tmp_path / "broken"
    shutil.copytree(scan_dir, copy)
    (copy / name).write_bytes(data)
    return copy


@pytest.mark.slow
def test_report_and_explain_on_broken_scan_folders(scan_dir, tmp_path):
    key = json.loads(subprocess.run([sys.executable, "-m", "cfbd_fast.cli.main", "explain", str(scan_dir), "x",
                                     "--json"], env=ENV, capture_output=True, text=True).stdout)["error"]
    assert "no row has key 'x'" in key
    assert _fails(["explain", str(scan_dir), "000000001", "--neighbours", "-1"], tmp_path) == \
        "Error: --neighbours -1: give a whole number from 0 to 1,000"
    assert _fails(["report", str(scan_dir), "--max-rows", HUGE, "--quiet"], tmp_path) == \
        f"Error: --max-rows {HUGE}: give a whole number from 0 to 1,000,000"
    empty = _broken_copy(scan_dir, tmp_path, "summary.json", b"{}")
    for command in (["report", str(empty), "--quiet"], ["explain", str(empty), "000000001"]):
        assert _fails(command, tmp_path).startswith(f"Error: {empty / 'summary.json'}: ")
    shutil.rmtree(empty)
    corrupt = _broken_copy(scan_dir, tmp_path, "scores.parquet", (scan_dir / "scores.parquet").read_bytes()[:100])
    for command in (["report", str(corrupt), "--quiet"], ["explain", str(corrupt), "000000001"]):
        assert _fails(command, tmp_path).startswith(f"Error: {corrupt / 'scores.parquet'}: ")


def test_store_commands_on_a_missing_store(tmp_path):
    for command in ("info", "verify", "skips"):
        assert _fails(["store", command, "absent.cfbd"], tmp_path) == "Error: absent.cfbd: no cfbd store here"
