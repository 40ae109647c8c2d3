"""Importers (.npy, clip-retrieval folders) and the `cfbd-fast store` commands, driven through CliRunner."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cfbd_fast.cli.main import app
from cfbd_fast.errors import InputError
from cfbd_fast.importers import from_npy, import_clip_retrieval
from cfbd_fast.store import EmbeddingStore

runner = CliRunner()


def _error_text(result) -> str:
    """What the user is told on failure: the printed error, or the exception the app exited with."""
    return result.output + str(result.exception or "")
PARTITION_ROWS = [5, 3, 6, 4, 2, 5, 3, 4, 6, 2, 7, 3]  # 12 partitions: numeric order differs from name order


def _unit_rows(rng, rows: int, dim: int) -> np.ndarray:
    values = rng.standard_normal((rows, dim)).astype(np.float32)
    return (values / np.linalg.norm(values, axis=1, keepdims=True)).astype(np.float16)


def _clip_retrieval_folder(root, dim: int = 16):
    """A folder in clip-retrieval's inference layout; returns the expected image, text, keys and captions."""
    rng = np.random.default_rng(0)
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True)
    images, texts, keys, captions = [], [], [], []
    for index, rows in enumerate(PARTITION_ROWS):
        image, text = _unit_rows(rng, rows, dim), _unit_rows(rng, rows, dim)
        np.save(root / "img_emb" / f"img_emb_{index}.npy", image)
        np.save(root / "text_emb" / f"text_emb_{index}.npy", text)
        paths = [f"/data/images/{index:03d}/{i}.jpg" for i in range(rows)]
        caption = [f"partition {index} caption {i}" for i in range(rows)]
        pq.write_table(pa.table({"image_path": paths, "caption": caption, "similarity": np.zeros(rows)}),
                       root / "metadata" / f"metadata_{index}.parquet")
        images.append(image), texts.append(text), keys.extend(paths), captions.extend(caption)
    return np.concatenate(images), np.concatenate(texts), keys, captions


def test_import_clip_retrieval_folder(tmp_path):
    image, text, keys, captions = _clip_retrieval_folder(tmp_path / "src")
    with import_clip_retrieval(tmp_path / "src", tmp_path / "out.cfbd", model="ViT-B-32", progress=False) as store:
        assert len(store) == sum(PARTITION_ROWS) and store.dtype == np.float16
        assert np.array_equal(store.image, image) and np.array_equal(store.text, text)
        assert store.meta.column("key").to_pylist() == keys
        assert store.meta.column("caption").to_pylist() == captions
        assert store.meta.column("row_id").to_pylist() == list(range(len(store)))
        assert store.normalized is True and store.model == "ViT-B-32"


def test_import_clip_retrieval_errors_name_the_file(tmp_path):
    _clip_retrieval_folder(tmp_path / "src")
    (tmp_path / "src" / "text_emb" / "text_emb_3.npy").unlink()
    with pytest.raises(InputError, match="text_emb_3.npy: missing"):
        import_clip_retrieval(tmp_path / "src", tmp_path / "a.cfbd", progress=False)
    np.save(tmp_path / "src" / "text_emb" / "text_emb_3.npy", np.zeros((9, 16), dtype=np.float16))
    with pytest.raises(InputError, match="text_emb_3.npy: shape"):
        import_clip_retrieval(tmp_path / "src", tmp_path / "b.cfbd", progress=False)
    np.save(tmp_path / "src" / "text_emb" / "text_emb_3.npy", np.zeros((4, 16), dtype=np.float16))
    pq.write_table(pa.table({"image_path": ["x"], "caption": ["y"]}), tmp_path / "src" / "metadata" / "metadata_7.parquet")
    with pytest.raises(InputError, match="metadata_7.parquet: 1 row, "):
        import_clip_retrieval(tmp_path / "src", tmp_path / "c.cfbd", progress=False)
    with pytest.raises(InputError, match="not a clip-retrieval output folder"):
        import_clip_retrieval(tmp_path / "nowhere", tmp_path / "d.cfbd", progress=False)
    assert not (tmp_path / "a.cfbd").exists()


def test_from_npy_streams_with_metadata(tmp_path):
    rng = np.random.default_rng(1)
    image, text = rng.standard_normal((25, 8)).astype(np.float32), rng.standard_normal((25, 8)).astype(np.float32)
    np.save(tmp_path / "i.npy", image), np.save(tmp_path / "t.npy", text)
    poisoned = [i % 4 == 0 for i in range(25)]
    pq.write_table(pa.table({"url": [f"https://x/{i}" for i in range(25)], "caption": [str(i) for i in range(25)],
                             "is_poisoned": poisoned}), tmp_path / "m.parquet", row_group_size=10)
    with from_npy(tmp_path / "i.npy", tmp_path / "t.npy", tmp_path / "s.cfbd", meta_parquet=tmp_path / "m.parquet",
                  dtype="bfloat16", batch_rows=8, progress=False) as store:
        assert store.image.tobytes() == image.astype(store.dtype).tobytes()
        assert store.meta.column("key").to_pylist() == [f"https://x/{i}" for i in range(25)]
        assert "source" not in store.meta.column_names  # the url is the key already
        assert store.meta.column("is_poisoned").to_pylist() == poisoned
        assert store.normalized is False


def test_from_npy_rejects_misaligned_inputs(tmp_path):
    np.save(tmp_path / "i.npy", np.zeros((5, 4), dtype=np.float32))
    np.save(tmp_path / "t.npy", np.zeros((6, 4), dtype=np.float32))
    with pytest.raises(InputError, match="t.npy: shape"):
        from_npy(tmp_path / "i.npy", tmp_path / "t.npy", tmp_path / "s.cfbd", progress=False)
    np.save(tmp_path / "t.npy", np.zeros((5, 4), dtype=np.float32))
    pq.write_table(pa.table({"caption": ["a"]}), tmp_path / "m.parquet")
    with pytest.raises(InputError, match="m.parquet: 1 row, the embeddings have 5 rows"):
        from_npy(tmp_path / "i.npy", tmp_path / "t.npy", tmp_path / "s.cfbd", meta_parquet=tmp_path / "m.parquet",
                 progress=False)
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(InputError, match="bad.npy: not a .npy file"):
        from_npy(tmp_path / "bad.npy", tmp_path / "t.npy", tmp_path / "s.cfbd", progress=False)


# ---- CLI -------------------------------------------------------------------------------------------------

def test_cli_store_info_human_and_json(tmp_path):
    image = np.ones((10, 4), dtype=np.float32)
    image[3] = 0
    image[4, 2] = np.nan
    EmbeddingStore.from_arrays(tmp_path / "s.cfbd", image=image, text=np.ones((10, 4)), model="RN50").close()
    result = runner.invoke(app, ["store", "info", str(tmp_path / "s.cfbd"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "rows" in result.stdout and "RN50" in result.stdout
    assert "image health  1 rows with NaN/inf, 1 rows of zero norm" in result.stdout
    result = runner.invoke(app, ["store", "info", str(tmp_path / "s.cfbd"), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["rows"], info["dim"], info["dtype"], info["model"]) == (10, 4, "float32", "RN50")
    assert info["health"]["image"] == {"nonfinite_rows": 1, "zero_norm_rows": 1}
    assert info["health"]["text"] == {"nonfinite_rows": 0, "zero_norm_rows": 0}
    result = runner.invoke(app, ["store", "info", str(tmp_path / "s.cfbd"), "--json", "--no-health"])
    assert "health" not in json.loads(result.stdout)


def test_cli_store_info_errors(tmp_path):
    result = runner.invoke(app, ["store", "info", str(tmp_path / "missing.cfbd")])
    assert result.exit_code == 1 and "missing.cfbd" in _error_text(result)
    (tmp_path / "plain").mkdir()
    result = runner.invoke(app, ["store", "info", str(tmp_path / "plain")])
    assert result.exit_code == 1 and "not a cfbd store" in _error_text(result)


def test_cli_from_npy(tmp_path):
    np.save(tmp_path / "i.npy", np.ones((7, 3), dtype=np.float16))
    np.save(tmp_path / "t.npy", np.full((7, 3), 2, dtype=np.float16))
    pq.write_table(pa.table({"key": [str(i) for i in range(7)], "caption": ["c"] * 7}), tmp_path / "m.parquet")
    args = ["store", "from-npy", "--image", str(tmp_path / "i.npy"), "--text", str(tmp_path / "t.npy"),
            "--meta", str(tmp_path / "m.parquet"), "--model", "ViT-L-14", "--pretrained", "openai", "--quiet"]
    result = runner.invoke(app, [*args, str(tmp_path / "s.cfbd"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"] == 7
    with EmbeddingStore.open(tmp_path / "s.cfbd") as store:
        assert store.pretrained == "openai" and np.all(store.text == 2)
    result = runner.invoke(app, [*args, str(tmp_path / "s.cfbd")])
    assert result.exit_code == 1 and "already exists" in _error_text(result)
    result = runner.invoke(app, ["store", "from-npy", "--image", str(tmp_path / "i.npy"), str(tmp_path / "x.cfbd")])
    assert result.exit_code != 0 and "--text" in result.output


def test_cli_import_clip_retrieval(tmp_path):
    image, _, keys, _ = _clip_retrieval_folder(tmp_path / "src", dim=8)
    result = runner.invoke(app, ["store", "import-clip-retrieval", str(tmp_path / "src"), str(tmp_path / "o.cfbd"),
                                 "--dtype", "float32", "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"{sum(PARTITION_ROWS):,}" in result.stdout and "float32" in result.stdout
    with EmbeddingStore.open(tmp_path / "o.cfbd") as store:
        assert np.array_equal(store.image, image.astype(np.float32))
        assert store.meta.column("key").to_pylist() == keys
    result = runner.invoke(app, ["store", "import-clip-retrieval", str(tmp_path / "nope"), str(tmp_path / "p.cfbd")])
    assert result.exit_code == 1 and "not a clip-retrieval output folder" in _error_text(result)


def test_url_is_kept_beside_an_image_path_key(tmp_path):
    rng = np.random.default_rng(3)
    np.save(tmp_path / "i.npy", rng.standard_normal((4, 8)).astype(np.float32))
    np.save(tmp_path / "t.npy", rng.standard_normal((4, 8)).astype(np.float32))
    pq.write_table(pa.table({"image_path": [f"img/{i}.jpg" for i in range(4)], "url": [f"https://x/{i}" for i in range(4)],
                             "caption": list("abcd")}), tmp_path / "m.parquet")
    with from_npy(tmp_path / "i.npy", tmp_path / "t.npy", tmp_path / "s.cfbd", meta_parquet=tmp_path / "m.parquet",
                  progress=False) as store:
        assert store.meta.column("key").to_pylist() == [f"img/{i}.jpg" for i in range(4)]
        assert store.meta.column("source").to_pylist() == [f"https://x/{i}" for i in range(4)]
