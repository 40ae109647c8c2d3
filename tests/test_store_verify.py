"""`store verify` finds a flipped byte in any part; `store info` refuses it too; `store skips` lists the skip list."""
from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from cfbd_fast.cli.main import app
from cfbd_fast.store import EmbeddingStore

runner = CliRunner()


def _store(path):
    rng = np.random.default_rng(0)
    image = rng.standard_normal((30, 8)).astype(np.float16)
    meta = {"caption": [f"caption {i}" for i in range(30)], "key": [str(i) for i in range(30)]}
    EmbeddingStore.from_arrays(path, image=image, text=image[::-1], meta=meta, batch_rows=10).close()
    with EmbeddingStore.open(path, mode="a") as store:
        store.append(skipped={"key": ["img/7.jpg", "img/9.png"], "source": ["data.csv:9", "data.csv:11"],
                              "reason": ["unreadable", "missing"], "detail": ["truncated JPEG", None]})
    return path


def test_verify_passes_a_whole_store_and_names_a_flipped_part(tmp_path):
    store = _store(tmp_path / "s.cfbd")
    result = runner.invoke(app, ["store", "verify", str(store), "--json"])
    assert result.exit_code == 0, result.output
    checked = json.loads(result.stdout)
    assert checked["rows"] == 30 and checked["parts_checked"] == 4 and checked["files_checked"] == 7
    for part in ("meta/part-000001.parquet", "skipped/part-000000.parquet"):
        copy = tmp_path / f"flip{part[0]}.cfbd"
        _store(copy)
        data = bytearray((copy / part).read_bytes())
        data[len(data) // 2] ^= 0x10
        (copy / part).write_bytes(bytes(data))
        for command in (["store", "verify", str(copy)], ["store", "info", str(copy), "--quiet"]):
            result = runner.invoke(app, command)
            assert result.exit_code == 1, result.output
            assert result.stderr.strip().splitlines() == [
                f"Error: {copy / part}: corrupt {'metadata' if part[0] == 'm' else 'skip list'} part (size or "
                f"checksum differs from the commit record)"]


def test_skips_table_and_json(tmp_path):
    store = _store(tmp_path / "s.cfbd")
    result = runner.invoke(app, ["store", "skips", str(store)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["key", "source", "reason", "detail"]
    assert lines[1].split() == ["img/7.jpg", "data.csv:9", "unreadable", "truncated", "JPEG"]
    assert lines[2].split() == ["img/9.png", "data.csv:11", "missing"]
    as_json = json.loads(runner.invoke(app, ["store", "skips", str(store), "--json"]).stdout)
    assert as_json[1] == {"key": "img/9.png", "source": "data.csv:11", "reason": "missing", "detail": None}
    empty = tmp_path / "e.cfbd"
    EmbeddingStore.from_arrays(empty, image=np.eye(3, dtype=np.float32), text=np.eye(3, dtype=np.float32)).close()
    assert runner.invoke(app, ["store", "skips", str(empty)]).stdout == f"{empty}: the skip list is empty\n"
