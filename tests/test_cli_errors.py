"""Every bad input to embed, store, report and explain ends in exit code 1 and one line: no traceback, nothing
left behind. Each case runs the real CLI in a subprocess."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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
def scan_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scan")
    store, _ = write_demo_stores(root, rows=2000, dim=16, poison_rate=0.01, seed=3, reference_rows=500,
                                 progress=False)
    proc = subprocess.run([sys.executable, "-m", "cfbd_fast.cli.main", "scan", str(store), "--mapper", "self",
                           "--out", str(root / "out"), "--quiet"], env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return root / "out"


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
