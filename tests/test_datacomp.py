"""`cfbd-fast store import-datacomp`: .npz features + .parquet metadata shards, checked, keyed by uid; a scan of
the imported store filters back to DataComp's own subset file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cfbd_fast.cli.main import app
from cfbd_fast.store import EmbeddingStore

runner = CliRunner()


def _invoke(*args, expect: int = 0):
    result = runner.invoke(app, [*map(str, args), "--quiet"] + (["--json"] if expect == 0 else []))
    assert result.exit_code == expect, result.output
    return json.loads(result.stdout) if expect == 0 else result.stderr.strip()


def _unit(rng, rows: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def _write_pool(folder: Path, sizes=(70, 50), seed: int = 0) -> dict:
    """Shards as DataComp ships them: NNNNNNNN.npz (b32_img/b32_txt 12-d, l14_img/l14_txt 16-d) and
    NNNNNNNN.parquet (uid, url, text, clip scores). Returns the concatenated l14 arrays and metadata."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    pool = {"uid": [], "text": [], "url": [], "image": [], "txt": []}
    for shard, rows in enumerate(sizes):
        l14_img, l14_txt = _unit(rng, rows, 16), _unit(rng, rows, 16)
        np.savez(folder / f"{shard:08d}.npz", b32_img=_unit(rng, rows, 12), b32_txt=_unit(rng, rows, 12),
                 l14_img=l14_img, l14_txt=l14_txt)
        uids = [rng.bytes(16).hex() for _ in range(rows)]
        text = [f"caption {shard}-{i}" for i in range(rows)]
        urls = [f"https://example.com/{u}.jpg" for u in uids]
        pq.write_table(pa.table({"uid": uids, "url": urls, "text": text,
                                 "clip_l14_similarity_score": rng.random(rows)}), folder / f"{shard:08d}.parquet")
        for name, value in (("uid", uids), ("text", text), ("url", urls), ("image", [l14_img]), ("txt", [l14_txt])):
            pool[name] += value
    pool["image"], pool["txt"] = np.concatenate(pool["image"]), np.concatenate(pool["txt"])
    return pool


def test_import_keys_rows_by_uid_and_keeps_features_and_captions(tmp_path):
    pool = _write_pool(tmp_path / "pool")
    info = _invoke("store", "import-datacomp", tmp_path / "pool", tmp_path / "p.cfbd", "--features", "l14",
                   "--model", "ViT-L-14")
    assert (info["rows"], info["dim"], info["dtype"], info["normalized"]) == (120, 16, "float16", True)
    with EmbeddingStore.open(tmp_path / "p.cfbd") as store:
        assert np.array_equal(store.image, pool["image"]) and np.array_equal(store.text, pool["txt"])
        meta = store.meta.to_pydict()
        assert (meta["key"], meta["caption"], meta["source"]) == (pool["uid"], pool["text"], pool["url"])
    info = _invoke("store", "import-datacomp", tmp_path / "pool", tmp_path / "b.cfbd", "--features", "b32")
    assert info["dim"] == 12


def test_scan_of_the_pool_filters_to_the_subset_file(tmp_path):
    pool = _write_pool(tmp_path / "pool")
    _invoke("store", "import-datacomp", tmp_path / "pool", tmp_path / "p.cfbd")
    _invoke("scan", tmp_path / "p.cfbd", "--mapper", "self", "--method", "coarse", "--out", tmp_path / "scan")
    kept = (tmp_path / "scan" / "keep.txt").read_text().split()
    assert 0 < len(kept) < 120
    record = _invoke("filter", tmp_path / "scan", tmp_path / "pool", "--format", "datacomp-uids", "--out",
                     tmp_path / "subset")
    assert record["written"] == len(kept) and record["unknown"] == 0
    subset = np.load(tmp_path / "subset" / "uids.npy")
    as_ints = [(int(hi) << 64) | int(lo) for hi, lo in subset.tolist()]
    assert as_ints == sorted(int(u, 16) for u in kept) and set(kept) <= set(pool["uid"])


def _rewrite(path: Path, **columns) -> None:
    table = pq.read_table(path)
    for name, values in columns.items():
        table = table.set_column(table.column_names.index(name), name, pa.array(values))
    pq.write_table(table, path)


@pytest.mark.parametrize("damage, message", [
    ("no_npz", "00000001.npz: missing"),
    ("no_key", "no 'l14_txt' array"),
    ("rows", "00000001.parquet: 49 rows, 00000001.npz has 50 rows"),
    ("dim", "00000001.npz: l14_img has dim 8, earlier shards have 16"),
    ("dup_across", "also in 00000000.parquet"),
    ("dup_within", "appears twice in this shard"),
    ("bad_uid", "is not 32 hexadecimal digits"),
])
def test_each_damage_is_one_line_naming_the_file(tmp_path, damage, message):
    pool = _write_pool(tmp_path / "pool")
    shard = tmp_path / "pool" / "00000001"
    rng = np.random.default_rng(9)
    if damage == "no_npz":
        shard.with_suffix(".npz").unlink()
    elif damage == "no_key":
        np.savez(shard.with_suffix(".npz"), l14_img=_unit(rng, 50, 16))
    elif damage == "rows":
        pq.write_table(pq.read_table(shard.with_suffix(".parquet")).slice(0, 49), shard.with_suffix(".parquet"))
    elif damage == "dim":
        np.savez(shard.with_suffix(".npz"), l14_img=_unit(rng, 50, 8), l14_txt=_unit(rng, 50, 8))
    elif damage in ("dup_across", "dup_within", "bad_uid"):
        uids = pq.read_table(shard.with_suffix(".parquet")).column("uid").to_pylist()
        uids[3] = {"dup_across": pool["uid"][5], "dup_within": uids[4], "bad_uid": "not-a-uid"}[damage]
        _rewrite(shard.with_suffix(".parquet"), uid=uids)
    error = _invoke("store", "import-datacomp", tmp_path / "pool", tmp_path / "p.cfbd", expect=1)
    assert error.startswith("Error: ") and message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "p.cfbd").exists()
