"""`cfbd-fast filter`: the cleaned copy holds exactly the kept keys, byte-equal, in every input format; a filter
killed mid-way resumes to the same bytes; unknown keys are refused unless kept on purpose."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cfbd_fast.cli.main import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def _invoke(*args, expect: int = 0):
    result = runner.invoke(app, [*map(str, args), "--quiet"] + (["--json"] if expect == 0 else []))
    assert result.exit_code == expect, result.output
    return json.loads(result.stdout) if expect == 0 else result.stderr.strip()


def _write_verdict(scan: Path, keys: list[str], dropped: set[str], parts: int = 0) -> None:
    """A scan folder's scores.parquet (key, verdict), as one file or as a folder of PARTS parquet files."""
    scan.mkdir(parents=True)
    verdict = ["poisoned" if k in dropped else "benign" for k in keys]
    table = pa.table({"row_id": np.arange(len(keys)), "key": keys,
                      "verdict": pa.array(verdict).dictionary_encode()})
    if not parts:
        pq.write_table(table, scan / "scores.parquet")
        return
    (scan / "scores.parquet").mkdir()
    for i, chunk in enumerate(np.array_split(np.arange(len(keys)), parts)):
        pq.write_table(table.take(pa.array(chunk)), scan / "scores.parquet" / f"part-{i:03d}.parquet")


def _payload(key: str, size: int = 64) -> bytes:
    return np.random.default_rng(zlib.crc32(key.encode())).bytes(size)


# ---- CSV ------------------------------------------------------------------------------------------------

def test_table_rows_and_images_byte_equal(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    lines, keys = ["image,caption,is_poisoned\r\n"], []
    for i in range(12):
        key = f"images/{i:03d}.jpg"
        (data / key).write_bytes(_payload(key))
        caption = f'"a caption, with a comma\nand a newline {i}"' if i == 4 else f"caption {i}"
        lines.append(f"{key},{caption},{int(i % 5 == 0)}\r\n")
        keys.append(key)
    (data / "data.csv").write_text("".join(lines), newline="")
    dropped = {keys[0], keys[5], keys[10]}
    _write_verdict(tmp_path / "scan", keys, dropped)

    record = _invoke("filter", tmp_path / "scan", data / "data.csv", "--out", tmp_path / "clean")
    assert (record["rows"], record["written"], record["dropped"], record["unknown"]) == (12, 9, 3, 0)
    kept = [i for i, k in enumerate(keys) if k not in dropped]
    assert (tmp_path / "clean" / "data.csv").read_bytes().decode() == lines[0] + "".join(lines[i + 1] for i in kept)
    written = sorted(str(p.relative_to(tmp_path / "clean" / "images")) for p in (tmp_path / "clean" / "images").iterdir())
    assert written == [Path(keys[i]).name for i in kept]
    assert all((tmp_path / "clean" / keys[i]).read_bytes() == (data / keys[i]).read_bytes() for i in kept)

    record = _invoke("filter", tmp_path / "scan", data, "--drop", "--out", tmp_path / "flagged")
    rows = (tmp_path / "flagged" / "data.csv").read_bytes().decode().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == sorted(dropped) and record["written"] == 3


# ---- img2dataset ----------------------------------------------------------------------------------------

def _write_img2dataset(folder: Path) -> list[str]:
    keys = []
    for shard in range(2):
        (folder / f"{shard:05d}").mkdir(parents=True)
        rows = {"key": [], "status": [], "caption": [], "url": []}
        for i in range(6):
            key = f"{shard:05d}{i:04d}"
            failed = shard == 1 and i == 3
            rows["key"].append(key)
            rows["status"].append("failed_to_download" if failed else "success")
            rows["caption"].append(f"caption of {key}")
            rows["url"].append(f"https://example.com/{key}.jpg")
            if not failed:
                for suffix in ("jpg", "txt", "json"):
                    (folder / f"{shard:05d}" / f"{key}.{suffix}").write_bytes(_payload(key + suffix))
                keys.append(key)
        pq.write_table(pa.table(rows), folder / f"{shard:05d}.parquet")
    return keys


def test_img2dataset_shards_keep_their_files_and_tables(tmp_path):
    keys = _write_img2dataset(tmp_path / "data")
    dropped = {keys[1], keys[7]}
    _write_verdict(tmp_path / "scan", keys, dropped, parts=3)
    record = _invoke("filter", tmp_path / "scan", tmp_path / "data", "--out", tmp_path / "clean")
    assert (record["rows"], record["written"], record["dropped"]) == (11, 9, 2)
    for shard in ("00000", "00001"):
        table = pq.read_table(tmp_path / "clean" / f"{shard}.parquet").to_pydict()
        want = [k for k in keys if k.startswith(shard) and k not in dropped]
        assert table["key"] == want and set(table["status"]) == {"success"}
        assert table["caption"] == [f"caption of {k}" for k in want]
        files = sorted(p.name for p in (tmp_path / "clean" / shard).iterdir())
        assert files == sorted(f"{k}.{s}" for k in want for s in ("jpg", "txt", "json"))
        assert all((tmp_path / "clean" / shard / f).read_bytes() == (tmp_path / "data" / shard / f).read_bytes()
                   for f in files)
    assert record["shard_counts"]["00001"] == {"rows": 5, "written": 4, "dropped": 1, "unknown": 0}


# ---- webdataset, from a real embed and scan ---------------------------------------------------------------

def _write_tar(path: Path, keys: list[str], suffixes=("jpg", "txt")) -> None:
    with tarfile.open(path, "w") as tar:
        for key in keys:
            for suffix in suffixes:
                data = _payload(key) if suffix != "txt" else f"a caption of {key}".encode()
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


@pytest.fixture(scope="module")
def scanned_shards(tmp_path_factory):
    """Three .tar shards of real PNGs embedded by `cfbd-fast embed` (tiny model) and scanned by `cfbd-fast scan`."""
    from PIL import Image

    root = tmp_path_factory.mktemp("wds")
    (root / "shards").mkdir()
    rng = np.random.default_rng(0)
    for shard in range(3):
        with tarfile.open(root / "shards" / f"{shard:05d}.tar", "w") as tar:
            for i in range(40):
                key = f"{shard:05d}{i:04d}"
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buffer, format="PNG")
                caption = "a photo of a banana." if i % 13 == 0 else f"a picture of thing {shard * 40 + i}"
                for name, data in ((f"{key}.png", buffer.getvalue()), (f"{key}.txt", caption.encode()),
                                   (f"{key}.json", json.dumps({"key": key}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    _invoke("embed", root / "shards", "--model", "cfbd-tiny", "--out", root / "s.cfbd", "--workers", "0")
    _invoke("scan", root / "s.cfbd", "--mapper", "self", "--method", "coarse", "--out", root / "scan")
    return root


def test_webdataset_shards_hold_exactly_the_kept_keys(scanned_shards, tmp_path):
    root = scanned_shards
    kept = (root / "scan" / "keep.txt").read_text().split()
    scanned = pq.read_table(root / "scan" / "scores.parquet").column("key").to_pylist()
    assert 0 < len(kept) < len(scanned) == 120
    record = _invoke("filter", root / "scan", root / "shards", "--out", tmp_path / "clean")
    assert (record["rows"], record["written"], record["dropped"]) == (120, len(kept), 120 - len(kept))
    for shard in ("00000.tar", "00001.tar", "00002.tar"):
        source, clean = _tar_members(root / "shards" / shard), _tar_members(tmp_path / "clean" / shard)
        assert clean == [(n, b) for n, b in source if n.split(".")[0] in kept]
        in_shard = {n.split(".")[0] for n, _ in source}
        assert record["shard_counts"][shard]["dropped"] == len(in_shard - set(kept))
    # the same verdict from keep.txt/poisoned.txt/invalid.txt alone gives the same shards
    lists = tmp_path / "lists"
    lists.mkdir()
    for name in ("keep.txt", "poisoned.txt", "invalid.txt"):
        (lists / name).write_bytes((root / "scan" / name).read_bytes())
    _invoke("filter", lists, str(root / "shards" / "*.tar"), "--out", tmp_path / "again")
    for shard in ("00000.tar", "00001.tar", "00002.tar"):
        assert (tmp_path / "again" / shard).read_bytes() == (tmp_path / "clean" / shard).read_bytes()


def test_unknown_keys_are_refused_unless_kept(tmp_path):
    (tmp_path / "shards").mkdir()
    _write_tar(tmp_path / "shards" / "00000.tar", ["a1", "a2", "a3"])
    _write_verdict(tmp_path / "scan", ["a1", "a3"], {"a3"})
    error = _invoke("filter", tmp_path / "scan", tmp_path / "shards", "--out", tmp_path / "clean", expect=1)
    assert error.startswith("Error: ") and "00000.tar key a2" in error and "--keep-unknown" in error
    assert len(error.splitlines()) == 1 and not (tmp_path / "clean" / "00000.tar").exists()
    record = _invoke("filter", tmp_path / "scan", tmp_path / "shards", "--out", tmp_path / "clean2", "--keep-unknown")
    assert [n for n, _ in _tar_members(tmp_path / "clean2" / "00000.tar")] == ["a1.jpg", "a1.txt", "a2.jpg", "a2.txt"]
    assert record["unknown"] == 1
    error = _invoke("filter", tmp_path / "scan", tmp_path / "shards", "--out", tmp_path / "clean2", "--drop", expect=1)
    assert "holds a filter of other inputs or options" in error
    error = _invoke("filter", tmp_path / "nothing", tmp_path / "shards", "--out", tmp_path / "c3", expect=1)
    assert "nothing" in error and "cfbd-fast scan" in error


# ---- DataComp uids -----------------------------------------------------------------------------------------

def test_datacomp_uid_list_is_sorted_128_bit_pairs(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "pool").mkdir()
    uids = []
    for shard in range(2):
        shard_uids = [rng.bytes(16).hex() for _ in range(50)]
        pq.write_table(pa.table({"uid": shard_uids, "text": ["t"] * 50}), tmp_path / "pool" / f"{shard:08d}.parquet")
        np.savez(tmp_path / "pool" / f"{shard:08d}.npz", l14_img=np.zeros((50, 4), np.float16))
        uids += shard_uids
    dropped = set(uids[::7])
    _write_verdict(tmp_path / "scan", uids, dropped)
    record = _invoke("filter", tmp_path / "scan", tmp_path / "pool", "--out", tmp_path / "subset")
    assert record["written"] == 100 - len(dropped)
    array = np.load(tmp_path / "subset" / "uids.npy")
    raw = (tmp_path / "subset" / "uids.npy").read_bytes()[-16 * len(array):]
    assert array.dtype == np.dtype("<u8,<u8") and len(raw) == 16 * record["written"]
    want = sorted(int(u, 16) for u in uids if u not in dropped)
    assert [(int(hi) << 64) | int(lo) for hi, lo in array.tolist()] == want
    hi, lo = np.frombuffer(raw, "<u8")[0::2], np.frombuffer(raw, "<u8")[1::2]
    assert ((int(hi[0]) << 64) | int(lo[0])) == want[0]


# ---- a killed filter resumes ------------------------------------------------------------------------------

def test_sigkilled_filter_resumes_to_the_same_bytes(tmp_path):
    (tmp_path / "shards").mkdir()
    keys = []
    for shard in range(24):
        shard_keys = [f"{shard:05d}{i:05d}" for i in range(1500)]
        _write_tar(tmp_path / "shards" / f"{shard:05d}.tar", shard_keys, suffixes=("jpg", "txt", "json"))
        keys += shard_keys
    _write_verdict(tmp_path / "scan", keys, set(keys[::9]))
    _invoke("filter", tmp_path / "scan", tmp_path / "shards", "--out", tmp_path / "whole")

    command = [sys.executable, "-m", "cfbd_fast.cli.main", "filter", str(tmp_path / "scan"), str(tmp_path / "shards"),
               "--out", str(tmp_path / "killed"), "--quiet"]
    process = subprocess.Popen(command, cwd=ROOT)
    manifest = tmp_path / "killed" / "filter.json"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if manifest.is_file() and len(json.loads(manifest.read_text())["shards"]) >= 2:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the filter ended before it could be killed: give it more shards"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    record = json.loads(manifest.read_text())
    assert not record["complete"] and 2 <= len(record["shards"]) < 24
    subprocess.run(command, cwd=ROOT, check=True)
    whole = {p.name: p.read_bytes() for p in (tmp_path / "whole").iterdir() if p.suffix == ".tar"}
    resumed = {p.name: p.read_bytes() for p in (tmp_path / "killed").iterdir() if p.name != "filter.json"}
    assert resumed == whole and len(whole) == 24
    final = json.loads(manifest.read_text())
    assert final["complete"] and final["totals"] == json.loads((tmp_path / "whole" / "filter.json").read_text())["totals"]


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_header_reader_agrees_with_tarfile(tmp_path, tar_format):
    from cfbd_fast.embed.sources import _WDS_MEMBER as embed_rule
    from cfbd_fast.filter.formats import _WDS_MEMBER, _tar_members

    assert _WDS_MEMBER.pattern == embed_rule.pattern  # keys named as embed names them
    long_dir = "d" * 90 if tar_format == tarfile.USTAR_FORMAT else "deep/" + "x" * 150
    with tarfile.open(tmp_path / "s.tar", "w", format=tar_format) as tar:
        for i in range(20):
            data = _payload(str(i), size=100 * i)
            info = tarfile.TarInfo(f"{long_dir}/k{i:03d}.{'jpg' if i % 2 else 'txt'}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("a-folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    with tarfile.open(tmp_path / "s.tar") as tar:
        want = [(m.name, m.offset, m.offset_data, m.size, m.isfile()) for m in tar.getmembers()]
    assert [tuple(m) for m in _tar_members(tmp_path / "s.tar")] == want
