"""EmbeddingStore: round trips, zero-copy read-only views, appends, chunk streaming, malformed files, golden v1."""
from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cfbd_fast.errors import InputError, StoreFormatError
from cfbd_fast.store import EmbeddingStore, encode_commit_record

GOLDEN = Path(__file__).parent / "data" / "golden_v1.cfbd"
HEADER = struct.Struct("<8sIIIIQ24sII")  # the 64-byte v1 matrix header, as documented in docs/store-format.md


def _pairs(rows: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, dim)).astype(np.float32), rng.standard_normal((rows, dim)).astype(np.float32)


def _meta(start: int, rows: int) -> dict:
    return {"caption": [f"caption {i}" for i in range(start, start + rows)],
            "key": [f"{i:09d}" for i in range(start, start + rows)]}


@pytest.fixture
def small_store(tmp_path) -> Path:
    image, text = _pairs(50, 8)
    EmbeddingStore.from_arrays(tmp_path / "s.cfbd", image=image, text=text, meta=_meta(0, 50), batch_rows=20).close()
    return tmp_path / "s.cfbd"


def _rewrite_header(path: Path, **fields) -> None:
    names = ["magic", "format_version", "dtype", "dim", "header_size", "data_offset", "name", "reserved", "checksum"]
    with open(path, "r+b") as fh:
        values = dict(zip(names, HEADER.unpack(fh.read(64))))
        values.update(fields)
        packed = HEADER.pack(*(values[n] for n in names))
        values["checksum"] = zlib.crc32(packed[:60])
        fh.seek(0)
        fh.write(HEADER.pack(*(values[n] for n in names)))


def _rewrite_record(store: Path, **fields) -> None:
    record = json.loads((store / "store.json").read_text())
    record.pop("sha256")
    record.update(fields)
    (store / "store.json").write_bytes(encode_commit_record(record))


# ---- round trips and views -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_round_trip_each_dtype(tmp_path, dtype):
    image, text = _pairs(37, 12)
    meta = {**_meta(0, 37), "is_poisoned": [i % 5 == 0 for i in range(37)]}
    with EmbeddingStore.from_arrays(tmp_path / "r.cfbd", image=image, text=text, meta=meta, model="ViT-B-32",
                                    pretrained="openai", dtype=dtype, batch_rows=10):
        pass
    expected_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    with EmbeddingStore.open(tmp_path / "r.cfbd") as store:
        assert len(store) == 37 and store.dim == 12 and store.dtype == expected_dtype
        assert store.image.dtype == expected_dtype and store.image.shape == (37, 12)
        assert store.image.tobytes() == image.astype(expected_dtype).tobytes()
        assert store.text.tobytes() == text.astype(expected_dtype).tobytes()
        assert store.meta.column("row_id").to_pylist() == list(range(37))
        assert store.meta.column("caption").to_pylist() == meta["caption"]
        assert store.meta.column("key").to_pylist() == meta["key"]
        assert store.meta.column("is_poisoned").to_pylist() == meta["is_poisoned"]
        info = store.info
        assert (info["rows"], info["dim"], info["dtype"], info["model"], info["pretrained"]) == \
            (37, 12, dtype, "ViT-B-32", "openai")
        assert info["format_version"] == 1 and info["size_bytes"] > 2 * 37 * 12 * expected_dtype.itemsize


def test_views_are_zero_copy_and_see_the_file(small_store):
    with EmbeddingStore.open(small_store) as store:
        first, second = store.image, store.image
        assert np.shares_memory(first, second)
        assert not first.flags.owndata
        # The view is the file's mapping: a byte written to the file shows up in the array already handed out.
        row_bytes = store.dim * store.dtype.itemsize
        replacement = np.full(store.dim, 7.0, dtype=store.dtype)
        fd = os.open(small_store / "image.emb", os.O_WRONLY)
        try:
            os.pwrite(fd, replacement.tobytes(), 4096 + 3 * row_bytes)
        finally:
            os.close(fd)
        assert np.array_equal(first[3], replacement)


def test_views_are_read_only_and_outlive_the_store(small_store):
    store = EmbeddingStore.open(small_store)
    image = store.image
    expected = image.copy()
    assert not image.flags.writeable
    with pytest.raises(ValueError):
        image[0, 0] = 1
    with pytest.raises(ValueError):
        image.setflags(write=True)
    store.close()
    del store
    assert np.array_equal(image, expected)


def test_closed_store_refuses_reads(small_store):
    store = EmbeddingStore.open(small_store)
    store.close()
    with pytest.raises(InputError, match="closed"):
        store.image


def test_fingerprint_is_stable_and_tracks_content(small_store, tmp_path):
    with EmbeddingStore.open(small_store) as store:
        fingerprint = store.fingerprint
    assert len(fingerprint) == 16
    shutil.copytree(small_store, tmp_path / "copy.cfbd")
    with EmbeddingStore.open(tmp_path / "copy.cfbd") as copy:
        assert copy.fingerprint == fingerprint
    with EmbeddingStore.open(tmp_path / "copy.cfbd", mode="a") as copy:
        copy.append(image=np.zeros((1, 8)), text=np.zeros((1, 8)))
        assert copy.fingerprint != fingerprint


# ---- appends ---------------------------------------------------------------------------------------------

def test_appends_across_reopen(tmp_path):
    image, text = _pairs(30, 6)
    path = tmp_path / "a.cfbd"
    with EmbeddingStore.create(path, dim=6, dtype="float32", model="m", normalized=False) as store:
        store.append(image=image[:10], text=text[:10], meta=_meta(0, 10))
        store.append(image=image[10:12], text=text[10:12], meta=pa.table(_meta(10, 2)))
        assert len(store) == 12 and np.array_equal(store.image, image[:12])
    with EmbeddingStore.open(path, mode="a") as store:
        store.append(image=image[12:], text=text[12:], meta=_meta(12, 18))
    with EmbeddingStore.open(path) as store:
        assert len(store) == 30
        assert np.array_equal(store.image, image) and np.array_equal(store.text, text)
        assert store.meta.column("row_id").to_pylist() == list(range(30))
        assert store.meta.column("key").to_pylist() == _meta(0, 30)["key"]
        assert len(list((path / "meta").iterdir())) == 3


def test_append_validates_input(tmp_path):
    with EmbeddingStore.create(tmp_path / "v.cfbd", dim=4) as store:
        with pytest.raises(InputError, match="one array per matrix"):
            store.append(image=np.zeros((2, 4)))
        with pytest.raises(InputError, match=r"shape \(rows, 4\)"):
            store.append(image=np.zeros((2, 5)), text=np.zeros((2, 5)))
        with pytest.raises(InputError, match="same number of rows"):
            store.append(image=np.zeros((2, 4)), text=np.zeros((3, 4)))
        with pytest.raises(InputError, match="unknown columns"):
            store.append(image=np.zeros((2, 4)), text=np.zeros((2, 4)), meta={"label": [1, 2]})
        with pytest.raises(InputError, match="meta has 1 rows"):
            store.append(image=np.zeros((2, 4)), text=np.zeros((2, 4)), meta={"caption": ["x"]})
        assert len(store) == 0
    with EmbeddingStore.open(tmp_path / "v.cfbd") as store:
        with pytest.raises(InputError, match="read-only"):
            store.append(image=np.zeros((1, 4)), text=np.zeros((1, 4)))
    with pytest.raises(InputError, match="already exists"):
        EmbeddingStore.create(tmp_path / "v.cfbd", dim=4)


def test_uncommitted_tail_is_ignored_then_cut_on_resume(small_store):
    with open(small_store / "image.emb", "ab") as fh:  # an append that wrote data but never committed
        fh.write(b"\x01" * 8 * 4 * 7)
    (small_store / "meta" / "part-000003.parquet").write_bytes(b"half-written")
    (small_store / "store.json.tmp").write_bytes(b"{")
    with EmbeddingStore.open(small_store) as store:
        assert len(store) == 50 and store.image.shape == (50, 8)
        committed = store.image.copy()
    with EmbeddingStore.open(small_store, mode="a") as store:
        assert not (small_store / "meta" / "part-000003.parquet").exists()
        assert not (small_store / "store.json.tmp").exists()
        assert os.path.getsize(small_store / "image.emb") == 4096 + 50 * 8 * 4
        store.append(image=np.ones((2, 8)), text=np.ones((2, 8)), meta=_meta(50, 2))
    with EmbeddingStore.open(small_store) as store:
        assert np.array_equal(store.image[:50], committed) and np.all(store.image[50:] == 1)
        assert store.meta.column("row_id").to_pylist() == list(range(52))


def test_normalized_is_detected(tmp_path):
    image, text = _pairs(20, 8)
    unit = image / np.linalg.norm(image, axis=1, keepdims=True)
    with EmbeddingStore.from_arrays(tmp_path / "u.cfbd", image=unit, text=unit, dtype="float16") as store:
        assert store.normalized is True
    with EmbeddingStore.from_arrays(tmp_path / "n.cfbd", image=image, text=unit) as store:
        assert store.normalized is False


# ---- chunk streaming -------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows", [1, 7, 50, 1000])
def test_iter_chunks_covers_every_row(small_store, rows):
    with EmbeddingStore.open(small_store) as store:
        starts = []
        for chunk in store.iter_chunks(rows=rows):
            assert len(chunk) == chunk.stop - chunk.start <= rows
            assert not chunk.image.flags.writeable
            assert np.array_equal(chunk.image, store.image[chunk.start:chunk.stop])
            assert np.array_equal(chunk.text, store.text[chunk.start:chunk.stop])
            starts.append(chunk.start)
        assert starts == list(range(0, 50, rows))


def test_iter_chunks_kept_chunks_stay_valid(small_store):
    with EmbeddingStore.open(small_store) as store:
        chunks = list(store.iter_chunks(rows=3))  # all alive at once: buffers must not be reused
        assert np.array_equal(np.concatenate([c.image for c in chunks]), store.image)
        assert np.array_equal(np.concatenate([c.text for c in chunks]), store.text)


def test_iter_chunks_range_subset_and_early_exit(small_store):
    with EmbeddingStore.open(small_store) as store:
        chunks = list(store.iter_chunks(rows=4, matrices=("text",), start=5, stop=18))
        assert [(c.start, c.stop) for c in chunks] == [(5, 9), (9, 13), (13, 17), (17, 18)]
        assert np.array_equal(np.concatenate([c.text for c in chunks]), store.text[5:18])
        with pytest.raises(AttributeError, match="no matrix 'image'"):
            chunks[0].image
        for chunk in store.iter_chunks(rows=2):
            break
        assert list(store.iter_chunks(start=50)) == []
        with pytest.raises(InputError):
            store.iter_chunks(start=10, stop=51)
        with pytest.raises(InputError):
            store.iter_chunks(matrices=("depth",))


def test_health_counts_nonfinite_and_zero_rows(tmp_path):
    image, text = _pairs(30, 4)
    image[[2, 7]] = 0
    image[11, 1] = np.nan
    text[5, 0] = np.inf
    with EmbeddingStore.from_arrays(tmp_path / "h.cfbd", image=image, text=text) as store:
        health = store.health(rows=8)
    assert health == {"image": {"nonfinite_rows": 1, "zero_norm_rows": 2},
                      "text": {"nonfinite_rows": 1, "zero_norm_rows": 0}}


# ---- malformed stores ------------------------------------------------------------------------------------

def _open_error(path: Path, exc=StoreFormatError) -> str:
    with pytest.raises(exc) as info:
        store = EmbeddingStore.open(path)
        store.meta
    return str(info.value)


def test_missing_store(tmp_path):
    message = _open_error(tmp_path / "nothing.cfbd", FileNotFoundError)
    assert "nothing.cfbd" in message


def test_directory_without_commit_record(tmp_path):
    (tmp_path / "empty.cfbd").mkdir()
    assert "not a cfbd store" in _open_error(tmp_path / "empty.cfbd")


def test_missing_matrix_file(small_store):
    (small_store / "text.emb").unlink()
    message = _open_error(small_store)
    assert str(small_store / "text.emb") in message and "missing" in message


def test_truncated_matrix(small_store):
    os.truncate(small_store / "image.emb", 4096 + 47 * 8 * 4 + 5)
    message = _open_error(small_store)
    assert str(small_store / "image.emb") in message
    assert "commit record says 50 rows, image.emb holds 47" in message


def test_truncated_header(small_store):
    os.truncate(small_store / "image.emb", 40)
    assert "truncated header" in _open_error(small_store)


def test_bad_magic(small_store):
    with open(small_store / "text.emb", "r+b") as fh:
        fh.write(b"NOTCFBD!")
    message = _open_error(small_store)
    assert str(small_store / "text.emb") in message and "not a cfbd store" in message


def test_corrupt_header_checksum(small_store):
    with open(small_store / "image.emb", "r+b") as fh:
        fh.seek(16)  # inside `dim`
        fh.write(b"\x09")
    assert "corrupt header" in _open_error(small_store)


def test_newer_matrix_format_version(small_store):
    _rewrite_header(small_store / "image.emb", format_version=2)
    message = _open_error(small_store)
    assert str(small_store / "image.emb") in message
    assert "newer format version" in message and "upgrade cfbd-fast" in message


def test_newer_commit_record_version(small_store):
    _rewrite_record(small_store, format_version=2)
    message = _open_error(small_store)
    assert "store.json" in message and "newer format version" in message and "upgrade cfbd-fast" in message


def test_dtype_mismatch_between_matrices(small_store):
    _rewrite_header(small_store / "text.emb", dtype=1)  # float16 where image.emb and the record say float32
    message = _open_error(small_store)
    assert str(small_store / "text.emb") in message and "dtype mismatch between matrices" in message


def test_dim_mismatch_between_matrices(small_store):
    _rewrite_header(small_store / "text.emb", dim=4)
    message = _open_error(small_store)
    assert str(small_store / "text.emb") in message and "dim mismatch between matrices" in message


def test_dim_mismatch_with_commit_record(small_store):
    _rewrite_header(small_store / "image.emb", dim=4)
    _rewrite_header(small_store / "text.emb", dim=4)
    assert "the commit record says 8" in _open_error(small_store)


def test_commit_record_not_json(small_store):
    (small_store / "store.json").write_text('{"format": "cfbd-store", "rows": ')
    message = _open_error(small_store)
    assert str(small_store / "store.json") in message and "corrupt commit record" in message


def test_commit_record_checksum(small_store):
    text = (small_store / "store.json").read_text().replace('"rows": 50', '"rows": 40')
    (small_store / "store.json").write_text(text)
    assert "corrupt commit record (checksum mismatch)" in _open_error(small_store)


def test_commit_record_inconsistent_fields(small_store):
    _rewrite_record(small_store, rows=49)
    assert "part rows add up to 50, not 49" in _open_error(small_store)


def test_commit_record_of_another_format(small_store):
    (small_store / "store.json").write_text('{"format": "something-else"}')
    assert "not a cfbd store" in _open_error(small_store)


def test_missing_metadata_part(small_store):
    (small_store / "meta" / "part-000001.parquet").unlink()
    message = _open_error(small_store)
    assert "part-000001.parquet" in message and "missing" in message


def test_corrupt_metadata_part(small_store):
    part = small_store / "meta" / "part-000002.parquet"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    message = _open_error(small_store)
    assert "part-000002.parquet" in message and "corrupt metadata part" in message


# ---- large and old stores --------------------------------------------------------------------------------

def test_sparse_store_over_2_gib_opens(tmp_path):
    path = tmp_path / "big.cfbd"
    dim = 1024
    rows = (2**31) // (dim * 2) + 17  # float16 rows past the 2 GiB mark
    EmbeddingStore.create(path, dim=dim, dtype="float16", matrices=("image",)).close()
    with open(path / "image.emb", "r+b") as fh:
        fh.truncate(4096 + rows * dim * 2)  # sparse: no data blocks written
        fh.seek(4096 + (rows - 1) * dim * 2)
        fh.write(np.full(dim, 0.5, dtype=np.float16).tobytes())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"row_id": pa.array(np.arange(rows, dtype=np.int64)),
                             "caption": pa.nulls(rows, pa.string()), "key": pa.nulls(rows, pa.string())}), sink)
    part = sink.getvalue().to_pybytes()
    (path / "meta" / "part-000000.parquet").write_bytes(part)
    _rewrite_record(path, rows=rows, parts=[{"file": "meta/part-000000.parquet", "rows": rows, "bytes": len(part),
                                             "crc32": zlib.crc32(part)}])
    with EmbeddingStore.open(path) as store:
        assert len(store) == rows and store.image.shape == (rows, dim)
        assert store.image.nbytes > 2**31
        assert np.all(store.image[-1] == 0.5) and np.all(store.image[-2] == 0)
        last = list(store.iter_chunks(rows=4, start=rows - 3))
        assert [len(c) for c in last] == [3] and np.all(last[0].image[-1] == 0.5)
        assert store.meta.num_rows == rows


def test_golden_v1_store_keeps_opening():
    image = ((np.arange(24, dtype=np.float32).reshape(6, 4) - 10) / 8).astype(np.float16)
    with EmbeddingStore.open(GOLDEN) as store:
        assert (len(store), store.dim, store.dtype, store.matrices) == (6, 4, np.float16, ("image", "text"))
        assert (store.model, store.pretrained, store.normalized) == ("ViT-B-32", "openai", False)
        assert np.array_equal(store.image, image)
        assert np.array_equal(store.text, (image[::-1] * 0.5).astype(np.float16))
        assert store.meta.to_pydict() == {
            "row_id": list(range(6)),
            "caption": [f"caption {i}" for i in range(6)],
            "key": [f"key-{i}" for i in range(6)],
            "is_poisoned": [False, True, False, False, False, True],
        }
        assert store.fingerprint == "a7f66d2253ea2359"
        assert [(c.start, c.stop) for c in store.iter_chunks(rows=4)] == [(0, 4), (4, 6)]


RSS_PROBE = """
import sys
from pathlib import Path
import numpy as np
from cfbd_fast.store import EmbeddingStore

def rss_file_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024

store = EmbeddingStore.open(sys.argv[1])
base, peak = rss_file_mb(), 0.0
for chunk in store.iter_chunks(rows=512):
    int(chunk.image.view(np.uint64).sum()) + int(chunk.text.view(np.uint64).sum())
    peak = max(peak, rss_file_mb() - base)
before = rss_file_mb()
int(store.image.view(np.uint64).sum())
print(peak, rss_file_mb() - before)
"""


def test_iter_chunks_keeps_resident_memory_at_the_working_set(tmp_path):
    import subprocess
    import sys

    rows, dim = 16384, 1024  # 32 MiB per matrix in float16; chunks of 512 rows are 1 MiB per matrix
    block = np.ones((4096, dim), dtype=np.float16)
    with EmbeddingStore.create(tmp_path / "rss.cfbd", dim=dim) as store:
        for _ in range(rows // 4096):
            store.append(image=block, text=block)
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(tmp_path / "rss.cfbd")], capture_output=True,
                         text=True, check=True).stdout.split()
    streamed_peak_mb, mapped_walk_mb = map(float, out)
    assert mapped_walk_mb > 30  # a plain walk over the mapping keeps every page resident...
    assert streamed_peak_mb < 12  # ...streaming keeps about two chunks (4 MiB here)
