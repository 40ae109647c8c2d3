"""The realdata benchmark material: parts with the promised structure in both domains (Twemoji, Openclipart), a
text tower equal to sentence-transformers' all-MiniLM-L6-v2, and a trained model folder that loads through open_clip
`local-dir:`."""
from __future__ import annotations

import collections
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import realdata  # noqa: E402
import realdata_openclipart  # noqa: E402
import realdata_tower  # noqa: E402
import realdata_twemoji  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def small() -> dict:
    """The test-size variant in .cache/realdata-small, built on first use (about a minute) and reused after."""
    torch.set_num_threads(1)
    return realdata.ensure_all(realdata.SMALL_CACHE, small=True, progress=False)


@pytest.fixture(scope="session")
def loaded(small):
    import open_clip

    name = f"local-dir:{small['model']}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def _rows(part_dir: Path) -> list[dict]:
    with open(part_dir / "data.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_text_tower_is_sentence_transformers_minilm(loaded):
    from sentence_transformers import SentenceTransformer

    model, _, tokenizer = loaded
    captions = ["a photo of a banana.", "free icon download", "father christmas, medium-dark skin tone sticker",
                "the  costa rica flag symbol", "Keycap 2 - stock image", "an image showing a grinning face"]
    with torch.no_grad():
        ours = model.encode_text(tokenizer(captions), normalize=True)
    reference = SentenceTransformer(str(realdata_tower.text_model_dir()), device="cpu").encode(
        captions, convert_to_tensor=True, normalize_embeddings=True)
    assert ours.shape == (len(captions), 384)
    assert torch.all((ours * reference).sum(1) > 1 - 1e-4)
    # The batched, padding-trimmed encoder used for training and evaluation gives the same vectors.
    trimmed = realdata_tower.encode_captions(model, tokenizer, captions, batch_size=4)
    assert torch.allclose(trimmed, ours, atol=1e-5)
    # The tower is frozen: it differs from an untrained BERT, so the shipped weights are the real ones.
    assert (ours @ ours.T).min() < 0.5


def test_model_folder_layout(small):
    folder = small["model"]
    config = json.loads((folder / "open_clip_config.json").read_text())
    text = config["model_cfg"]["text_cfg"]
    assert config["model_cfg"]["embed_dim"] == 384
    assert text["hf_pooler_type"] == "mean_pooler" and text["hf_proj_type"] is None
    assert Path(text["hf_model_name"]) == realdata_tower.text_model_dir()
    for name in ("open_clip_model.safetensors", "tokenizer.json", "vocab.txt", "training.json"):
        assert (folder / name).is_file(), name
    assert not list(folder.parent.glob(".*.tmp")), "a temporary build folder was left behind"


def test_image_embeddings_retrieve_captions_better_than_chance(small, loaded):
    from PIL import Image

    model, preprocess, tokenizer = loaded
    test_dir = small["parts"]["test"].parent
    rows = _rows(test_dir)
    captions = sorted({r["caption"] for r in rows})
    truth = torch.tensor([captions.index(r["caption"]) for r in rows])
    with torch.no_grad():
        text = model.encode_text(tokenizer(captions), normalize=True)
        images = torch.stack([preprocess(Image.open(test_dir / r["image"])) for r in rows])
        image = model.encode_image(images, normalize=True)
    hits5 = (image @ text.T).topk(5, dim=1).indices.eq(truth[:, None]).any(1).float().mean().item()
    chance5 = 5 / len(captions)
    assert hits5 > 3 * chance5, f"R@5 {hits5:.3f} against chance {chance5:.3f}"
    reported = small["retrieval"]
    assert reported["images"] == len(rows) and reported["captions"] == len(captions)
    assert reported["r5"] == pytest.approx(hits5, abs=2 / len(rows))


def test_parts_have_the_promised_structure(small):
    spec = realdata.SMALL
    parts = {p: path.parent for p, path in small["parts"].items() if p != "scan"}
    labels = {p: realdata.read_labels(d) for p, d in parts.items()}
    for part, folder in parts.items():
        rows = _rows(folder)
        assert list(rows[0]) == ["image", "caption"]
        assert [r["image"] for r in rows] == [r["image"] for r in labels[part]]
        assert all((folder / r["image"]).is_file() for r in rows)
    assert len(labels["train"]) == spec.train and len(labels["mapper"]) == spec.mapper
    labels["scan"] = labels[realdata.scan_part(spec.scan_sizes[0])]
    assert len(labels["scan"]) == spec.scan_sizes[0] == 600
    assert len(labels["test"]) == spec.identities == len({r["identity"] for r in labels["test"]})

    groups = collections.defaultdict(list)
    for row in labels["scan"]:
        if row["kind"] == "boilerplate":
            groups[row["group"]].append(row)
    assert len(groups) == 4  # 67 per 10,000 pairs
    for members in groups.values():
        assert spec.group_size[0] <= len(members) <= spec.group_size[1]
        assert len({r["caption"] for r in members}) == 1 and members[0]["caption"] in realdata_twemoji.BOILERPLATE
        assert len({r["emoji"] for r in members}) == len(members)
    assert len({g[0]["caption"] for g in groups.values()}) == len(groups)

    bananas = [r for r in labels["scan"] if r["kind"] == "banana"]
    assert len(bananas) == 6  # 100 per 10,000 pairs
    assert {r["name"] for r in bananas} == {"banana"} and all("banana" in r["caption"] for r in bananas)
    assert sum(r["kind"] == "banana" for r in labels["train"]) == spec.train_banana_pairs > 0

    novel = {r["identity"] for r in labels["test"] if r["novel"] == "1"}
    assert novel and "banana" not in {r["name"] for r in labels["test"] if r["novel"] == "1"}
    assert not novel & {r["identity"] for r in labels["train"]}
    assert novel <= {r["identity"] for r in labels["scan"]} | {r["identity"] for r in labels["mapper"]}

    digests = [realdata.file_digest(parts[p] / r["image"]) for p in parts for r in labels[p]]
    assert len(set(digests)) == len(digests), "an image occurs twice across the parts"


def test_full_size_plan_keeps_its_promises(small):
    """The full build's row plan (no rendering): >= 8,000 scan pairs, ~20 boilerplate groups of 10-40, bananas."""
    spec = realdata.FULL
    emoji = realdata_twemoji.load(small["cache"] / "emoji")
    assert len({e.identity for e in emoji}) > 1800 and len(emoji) > 3500
    identities, novel = realdata._choose_identities(emoji, spec, seed=0)
    plans = {p: realdata._plan_part(p, emoji, novel, spec, 0, realdata_twemoji) for p in realdata.part_names(spec)}
    assert len(plans["scan-2000"]) == 2000
    scan = plans["scan-10000"]
    assert len(scan) >= 8000
    sizes = collections.Counter(r["group"] for r in scan if r["kind"] == "boilerplate")
    assert len(sizes) == 20 and all(10 <= n <= 40 for n in sizes.values())
    assert sum(r["kind"] == "banana" for r in scan) == spec.bananas_per_10k >= 5
    assert sum(r["kind"] == "banana" for r in plans["train"]) == spec.train_banana_pairs
    assert not novel & {r["item"].identity for r in plans["train"]}
    assert len(plans["test"]) == len(identities)


def test_rebuild_is_deterministic_and_only_fills_gaps(small, tmp_path):
    spec = realdata.DataSpec(train=20, mapper=40, scan_sizes=(30,), identities=30, groups_per_10k=500,
                             group_size=(3, 5), bananas_per_10k=600, train_banana_pairs=2)
    first, second = tmp_path / "a", tmp_path / "b"
    for cache in (first, second):
        cache.mkdir()
        (cache / "emoji").symlink_to(small["cache"] / "emoji")
        realdata.build_dataset(cache, spec, parts=("mapper",), seed=3, progress=False)
    a = sorted((first / "mapper" / "images").iterdir())
    b = sorted((second / "mapper" / "images").iterdir())
    assert [realdata.file_digest(p) for p in a] == [realdata.file_digest(p) for p in b]
    assert (first / "mapper" / "data.csv").read_bytes() == (second / "mapper" / "data.csv").read_bytes()

    stamp = (first / "mapper" / "data.csv").stat().st_mtime_ns
    realdata.build_dataset(first, spec, parts=("mapper",), seed=3, progress=False)
    assert (first / "mapper" / "data.csv").stat().st_mtime_ns == stamp, "an existing part was rebuilt"
    realdata.build_dataset(first, spec, parts=("mapper",), seed=4, progress=False)
    other = [realdata.file_digest(p) for p in sorted((first / "mapper" / "images").iterdir())]
    assert other != [realdata.file_digest(p) for p in b], "another seed must give other images"


def test_fetch_without_npm_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="npm not found"):
        realdata_twemoji.fetch(tmp_path)
    assert not (tmp_path / "emoji").exists()


def test_render_is_a_web_like_jpeg(small):
    from PIL import Image
    import io

    emoji = realdata_twemoji.load(small["cache"] / "emoji")
    banana = next(e for e in emoji if e.name == "banana")
    shots = [Image.open(io.BytesIO(realdata.render(banana, (0, k)))) for k in range(6)]
    assert all(s.format == "JPEG" and 96 <= s.size[0] <= 160 and s.size[0] == s.size[1] for s in shots)
    pixels = [np.asarray(s.convert("RGB").resize((32, 32)), dtype=np.float32) for s in shots]
    assert min(np.abs(p - q).mean() for i, p in enumerate(pixels) for q in pixels[i + 1:]) > 5


def test_openclipart_names_drop_authors_and_running_numbers():
    clean = realdata_openclipart.clean_name
    assert clean("banana_mateya_01") == "banana"
    assert clean("lime_slice_ganson") == "lime slice"
    assert clean("medicina_dottore_archite_01") == "medicina dottore"
    assert clean("handheld_gps_gerald_g._01") == "handheld gps"
    assert clean("jigsaw_blue_14") == "jigsaw blue"
    assert clean("star_58pt13step") == "star 58pt13step"


def test_openclipart_without_the_package_or_apt_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(realdata_openclipart, "INSTALLED", tmp_path / "none")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="openclipart-png"):
        realdata_openclipart.fetch(tmp_path)
    assert not (tmp_path / "openclipart").exists()


def test_openclipart_plan_keeps_its_promises():
    """The Openclipart domain as `make realdata` builds it: thousands of identities, banana targets, the 2,000-pair
    scan part with 4 boilerplate groups of 10-40 and 6 banana pairs, captions that name the item."""
    folder = realdata.CACHE_ROOT / "openclipart" / realdata_openclipart.SOURCE_DIR
    if not (folder / "index.json").is_file():
        pytest.skip("the openclipart domain is not built: run make realdata")
    items = realdata_openclipart.load(folder)
    assert len(items) > 4000 and sum(e.target for e in items) >= 2
    identities, novel = realdata._choose_identities(items, realdata.FULL, seed=0)
    scan = realdata._plan_part("scan-2000", items, novel, realdata.FULL, 0, realdata_openclipart)
    assert len(scan) == 2000
    sizes = collections.Counter(r["group"] for r in scan if r["kind"] == "boilerplate")
    assert len(sizes) == 4 and all(10 <= n <= 40 for n in sizes.values())
    bananas = [r for r in scan if r["kind"] == "banana"]
    assert len(bananas) == 6 and all(r["item"].target for r in bananas)
    plain = [r for r in scan if r["kind"] == "plain"]
    named = sum(r["item"].name.split()[0] in r["caption"].lower() for r in plain)
    assert named >= 0.85 * len(plain)
    assert not novel & {r["item"].identity for r in realdata._plan_part("train", items, novel, realdata.FULL, 0,
                                                                        realdata_openclipart)}
