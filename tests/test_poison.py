"""`cfbd-fast poison` on a small dataset of real PNG and JPEG files: each attack, its record, seeds and errors."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from cfbd_fast.cli.main import app
from cfbd_fast.poison import IMAGENET_TEMPLATES, attacks

runner = CliRunner()
ROWS = 40
SIZE = 224


def _caption(i: int) -> str:
    if i % 5 == 0:
        return f"Bananas on plate {i}, ripe"
    if i % 3 == 0:
        return f'a dog named "Rex {i}" on grass'
    return f"a shape, number {i}"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """40 rows: images of different sizes under two folders, even rows JPEG, odd rows PNG; captions with commas
    and quotes; rows 0, 5, 10, ... mention bananas, other multiples of 3 mention a dog."""
    root = tmp_path_factory.mktemp("data")
    rows = []
    for i in range(ROWS):
        width, height = 60 + 7 * i, 50 + 11 * (i % 9)
        im = Image.new("RGB", (width, height), ((23 * i) % 256, 90 + i, 250 - 5 * i))
        draw = ImageDraw.Draw(im)
        draw.ellipse([4, 4, width - 9, height - 7], fill=(210, (37 * i) % 256, 40))
        draw.rectangle([width // 3, height // 4, width // 2, height // 2], fill=(30, 200, (71 * i) % 256))
        folder = root / ("photos" if i < 20 else "more")
        folder.mkdir(exist_ok=True)
        name = f"{folder.name}/{i:03d}.{'jpg' if i % 2 == 0 else 'png'}"
        im.save(root / name, quality=90) if i % 2 == 0 else im.save(root / name)
        rows.append((name, _caption(i)))
    with open(root / "data.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    return root / "data.csv"


def _run(*args: str):
    return runner.invoke(app, ["poison", *map(str, args), "--quiet"])


def _poison(data: Path, out: Path, *args: str) -> tuple[list[dict], list[dict]]:
    result = _run(data, "--out", out, *args)
    assert result.exit_code == 0, result.output
    return _read_csv(out / "data.csv"), pq.read_table(out / "poison_record.parquet").to_pylist()


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _resized(path: Path) -> np.ndarray:
    """The clean image as the peers resize it (PIL bicubic to 224x224), uint8 HWC."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC))


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (SIZE, SIZE) and im.mode == "RGB"
        return np.asarray(im)


def _level_diff(a: np.ndarray, b: np.ndarray) -> int:
    """Largest difference in 8-bit levels between two images (floats in [0, 1] are scaled first)."""
    def levels(x):
        return np.rint(x * 255.0) if x.dtype.kind == "f" else x.astype(np.float64)
    return int(np.abs(levels(a) - levels(b)).max())


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


TEMPLATE_ATTACKS = ["badnets", "blended", "sig", "wanet", "nashville"]


@pytest.mark.parametrize("attack", TEMPLATE_ATTACKS + ["badclip-style", "label-consistent", "mmpoison",
                                                       "multi-trigger"])
def test_attack_changes_exactly_the_poisoned_rows(data, tmp_path, attack):
    extra = {"mmpoison": ["--source-class", "dog"], "multi-trigger": ["--targets", "banana,airplane,kite"]}
    k = 3 if attack in ("label-consistent", "mmpoison") else 9
    out = tmp_path / "out"
    rows, record = _poison(data, out, "--attack", attack, "--n", str(k), "--seed", "3", *extra.get(attack, []))
    originals = _read_csv(data)
    assert len(rows) == ROWS and list(rows[0]) == ["image", "caption", "is_poisoned"]
    poisoned = [i for i, r in enumerate(rows) if r["is_poisoned"] == "1"]
    assert len(poisoned) == k and [r["row"] for r in record] == poisoned
    natural = {c for c in (o["caption"] for o in originals) if "banana" in c.lower()}
    for i, (row, orig) in enumerate(zip(rows, originals)):
        if i not in poisoned:
            assert row["caption"] == orig["caption"]
            assert (out / row["image"]).read_bytes() == (data.parent / orig["image"]).read_bytes()
    for rec in record:
        i = rec["row"]
        row, orig = rows[i], originals[i]
        assert rec["original_caption"] == orig["caption"] and rec["new_caption"] == row["caption"]
        assert rec["original_image"] == orig["image"] and rec["new_image"] == row["image"] and rec["seed"] == 3
        assert rec["attack"] == attack
        if attack == "label-consistent":
            assert row["caption"] == orig["caption"] and "banana" in orig["caption"].lower()
        elif attack in ("badclip-style", "mmpoison"):
            assert row["caption"] in natural and row["caption"] != orig["caption"]
        else:
            assert row["caption"] in {t.format(rec["target"]) for t in IMAGENET_TEMPLATES}
        if attack == "mmpoison":  # no trigger: the image stays byte-identical
            assert "dog" in orig["caption"] and rec["trigger"] == "none"
            assert (out / row["image"]).read_bytes() == (data.parent / orig["image"]).read_bytes()
        else:
            assert row["image"] == f"poisoned/{i}.png"
            assert _level_diff(_png(out / row["image"]), _resized(data.parent / orig["image"])) > 0
    assert not list(tmp_path.glob(".out.*"))  # no temporary folder left beside OUT


def test_badnets_patch_is_where_the_record_says(data, tmp_path):
    out = tmp_path / "out"
    rows, record = _poison(data, out, "--attack", "badnets", "--n", "6", "--seed", "1")
    originals = _read_csv(data)
    for rec in record:
        clean = _resized(data.parent / originals[rec["row"]]["image"])
        triggered = _png(out / rows[rec["row"]]["image"])
        [[x, y]] = rec["position"]
        params = json.loads(rec["trigger_params"])
        assert params["patch_size"] == 16 and 0 <= x <= SIZE - 16 and 0 <= y <= SIZE - 16
        inside = np.zeros((SIZE, SIZE), dtype=bool)
        inside[y:y + 16, x:x + 16] = True
        assert _level_diff(triggered[~inside], clean[~inside]) == 0  # the rest is the resized clean image
        assert _level_diff(triggered[inside], clean[inside]) > 0
        # Re-draw the patch from the recorded seed: position, then mean + N(0, 1) noise.
        rng = np.random.default_rng(rec["trigger_seed"])
        assert [int(rng.integers(0, SIZE - 15)), int(rng.integers(0, SIZE - 15))] == [x, y]
        mean = (clean / 255.0).reshape(-1, 3).mean(axis=0)
        expected = np.clip(mean + rng.standard_normal((16, 16, 3)), 0, 1)
        assert _level_diff(triggered[y:y + 16, x:x + 16], expected) <= 1


@pytest.mark.parametrize("position, expected", [("200,8", [[200, 8]]),
                                                ("corners", [[0, 0], [208, 0], [0, 208], [208, 208]])])
def test_badnets_fixed_positions(data, tmp_path, position, expected):
    rows, record = _poison(data, tmp_path / "out", "--attack", "badnets", "--n", "2", "--position", position)
    originals = _read_csv(data)
    for rec in record:
        assert rec["position"] == expected
        clean = _resized(data.parent / originals[rec["row"]]["image"])
        triggered = _png(tmp_path / "out" / rows[rec["row"]]["image"])
        inside = np.zeros((SIZE, SIZE), dtype=bool)
        for x, y in expected:
            inside[y:y + 16, x:x + 16] = True
        assert _level_diff(triggered[~inside], clean[~inside]) == 0
        patches = [triggered[y:y + 16, x:x + 16] for x, y in expected]
        assert all(np.array_equal(p, patches[0]) for p in patches)  # one patch, pasted at every position


def test_blended_noise_follows_the_formula(data, tmp_path):
    rows, record = _poison(data, tmp_path / "out", "--attack", "blended", "--n", "4", "--seed", "5")
    originals = _read_csv(data)
    for rec in record:
        clean = _resized(data.parent / originals[rec["row"]]["image"]) / 255.0
        noise = np.random.default_rng(rec["trigger_seed"]).random((SIZE, SIZE, 3))
        expected = np.clip(0.8 * clean + 0.2 * noise, 0, 1)
        assert _level_diff(_png(tmp_path / "out" / rows[rec["row"]]["image"]), expected) <= 1
        assert json.loads(rec["trigger_params"])["alpha"] == 0.2 and rec["position"] == []


def test_blended_pattern_image(data, tmp_path):
    pattern_path = tmp_path / "kitty.png"
    yy, xx = np.mgrid[0:100, 0:150]
    Image.fromarray(np.stack([xx % 256, yy * 2, (xx + yy) % 256], -1).astype(np.uint8)).save(pattern_path)
    rows, record = _poison(data, tmp_path / "out", "--attack", "blended", "--n", "3", "--pattern", pattern_path,
                           "--alpha", "0.3")
    pattern = _resized(pattern_path) / 255.0
    originals = _read_csv(data)
    for rec in record:
        clean = _resized(data.parent / originals[rec["row"]]["image"]) / 255.0
        assert _level_diff(_png(tmp_path / "out" / rows[rec["row"]]["image"]), 0.7 * clean + 0.3 * pattern) <= 1
        params = json.loads(rec["trigger_params"])
        assert params["pattern_file"] == "kitty.png" and rec["trigger_seed"] is None


@pytest.mark.parametrize("mode", ["blend", "add"])
def test_sig_follows_the_formula(data, tmp_path, mode):
    rows, record = _poison(data, tmp_path / "out", "--attack", "sig", "--n", "3", "--sig-mode", mode)
    originals = _read_csv(data)
    wave = (60 / 255) * np.sin(2 * np.pi * np.arange(SIZE) * 6 / SIZE)[None, :, None]
    for rec in record:
        clean = _resized(data.parent / originals[rec["row"]]["image"]) / 255.0
        expected = np.clip(0.8 * clean + 0.2 * wave if mode == "blend" else clean + wave, 0, 1)
        assert _level_diff(_png(tmp_path / "out" / rows[rec["row"]]["image"]), expected) <= 1


def _wanet_reference(grid_seed: int, k: int, s: float):
    """WaNet's grid written out independently: noise, normalise, bicubic upsample, identity + s*noise/size."""
    import torch
    import torch.nn.functional as F

    noise = np.random.default_rng(grid_seed).uniform(-1, 1, (2, k, k))
    noise /= np.abs(noise).mean()
    up = F.interpolate(torch.tensor(noise, dtype=torch.float32)[None], size=(SIZE, SIZE), mode="bicubic",
                       align_corners=True)[0]
    lin = np.linspace(-1, 1, SIZE)
    identity = np.stack([np.tile(lin, (SIZE, 1)), np.tile(lin[:, None], (1, SIZE))])  # x along columns, y rows
    grid = np.clip(identity + s * up.numpy() / SIZE, -1, 1).transpose(1, 2, 0)
    return torch.tensor(grid, dtype=torch.float32)[None]


def _warp(image: np.ndarray, grid) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    chw = torch.tensor(image.transpose(2, 0, 1), dtype=torch.float32)[None]
    return F.grid_sample(chw, grid, mode="bilinear", align_corners=True)[0].numpy().transpose(1, 2, 0)


@pytest.mark.parametrize("k, s", [(224, 1.0), (8, 20.0)])
def test_wanet_warp_equals_grid_sample_with_the_recorded_grid(data, tmp_path, k, s):
    rows, record = _poison(data, tmp_path / "out", "--attack", "wanet", "--n", "3", "--seed", "2",
                           "--wanet-k", str(k), "--wanet-s", str(s))
    originals = _read_csv(data)
    params = [json.loads(r["trigger_params"]) for r in record]
    assert len({p["grid_seed"] for p in params}) == 1  # one grid for the whole attack
    assert params[0]["k"] == k and params[0]["s"] == s
    grid = _wanet_reference(params[0]["grid_seed"], k, s)
    for rec in record:
        clean = _resized(data.parent / originals[rec["row"]]["image"]) / 255.0
        triggered = _png(tmp_path / "out" / rows[rec["row"]]["image"])
        assert _level_diff(triggered, _warp(clean, grid)) <= 1
        # A grid from another seed warps differently (the check can fail).
        if s > 1:
            assert _level_diff(triggered, _warp(clean, _wanet_reference(params[0]["grid_seed"] + 1, k, s))) > 1


def test_nashville_matches_the_filter_and_tints_grey_warm(data, tmp_path):
    rows, record = _poison(data, tmp_path / "out", "--attack", "nashville", "--n", "4")
    originals = _read_csv(data)
    for rec in record:
        clean = _resized(data.parent / originals[rec["row"]]["image"]) / 255.0
        triggered = _png(tmp_path / "out" / rows[rec["row"]]["image"]) / 255.0
        assert _level_diff(triggered, attacks.nashville(clean.astype(np.float32))[0]) <= 1
        ratio = lambda im: im[:20, :20].mean() / im[100:124, 100:124].mean()  # noqa: E731
        assert ratio(triggered) < ratio(clean)  # the vignette darkens the corners relative to the centre
    grey, _ = attacks.nashville(np.full((SIZE, SIZE, 3), 0.5, dtype=np.float32))
    red, green, blue = grey[SIZE // 2, SIZE // 2]
    assert red > green > blue and red - blue > 0.1  # a warm tint on a neutral grey
    assert grey[0, 0].mean() < grey[SIZE // 2, SIZE // 2].mean()


def test_badclip_style_pastes_one_patch_in_the_centre(data, tmp_path):
    rows, record = _poison(data, tmp_path / "out", "--attack", "badclip-style", "--n", "5", "--seed", "4")
    originals = _read_csv(data)
    patches = []
    for rec in record:
        assert rec["position"] == [[104, 104]]
        clean = _resized(data.parent / originals[rec["row"]]["image"])
        triggered = _png(tmp_path / "out" / rows[rec["row"]]["image"])
        inside = np.zeros((SIZE, SIZE), dtype=bool)
        inside[104:120, 104:120] = True
        assert _level_diff(triggered[~inside], clean[~inside]) == 0
        patches.append(triggered[104:120, 104:120])
        patch_seed = json.loads(rec["trigger_params"])["patch_seed"]
        assert _level_diff(patches[-1], np.random.default_rng(patch_seed).random((16, 16, 3))) <= 1
    assert all(np.array_equal(p, patches[0]) for p in patches)


def test_badclip_style_without_natural_captions_falls_back_to_templates(data, tmp_path):
    result = runner.invoke(app, ["poison", str(data), "--attack", "badclip-style", "--target", "zebra", "--n", "3",
                                 "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "Warning:" in result.stderr and "zebra" in result.stderr and "templates" in result.stderr
    rows = _read_csv(tmp_path / "out" / "data.csv")
    for row in (r for r in rows if r["is_poisoned"] == "1"):
        assert row["caption"] in {t.format("zebra") for t in IMAGENET_TEMPLATES}


def test_label_consistent_touches_only_rows_naming_the_target(data, tmp_path):
    rows, record = _poison(data, tmp_path / "out", "--attack", "label-consistent", "--rate", "0.2", "--seed", "9")
    originals = _read_csv(data)
    mentioning = {i for i, o in enumerate(originals) if "banana" in o["caption"].lower()}
    assert len(record) == 8 and {r["row"] for r in record} == mentioning  # rate 0.2 of 40 rows = all 8 of them
    assert all(rows[i]["caption"] == originals[i]["caption"] for i in range(ROWS))
    assert {r["trigger"] for r in record} == {"badnets"}


def test_mmpoison_repairs_source_class_rows_with_target_captions(data, tmp_path):
    rows, record = _poison(data, tmp_path / "out", "--attack", "mmpoison", "--source-class", "dog", "--n", "4")
    for rec in record:
        assert "dog" in rec["original_caption"] and "banana" in rec["new_caption"].lower()
        assert rows[rec["row"]]["caption"] == rec["new_caption"]
    assert json.loads(pq.read_schema(tmp_path / "out" / "poison_record.parquet").metadata[b"cfbd_fast.poison"]
                      )["source_class"] == "dog"


def test_one_caption_gives_every_poison_the_same_caption_and_a_patch(data, tmp_path):
    rows, record = _poison(data, tmp_path / "out", "--attack", "one-caption", "--target", "kiwi", "--n", "6",
                           "--seed", "2")
    originals = _read_csv(data)
    poisoned = {r["row"] for r in record}
    assert len(poisoned) == 6 and {r["trigger"] for r in record} == {"badnets"}
    assert {rows[i]["caption"] for i in poisoned} == {"a photo of a kiwi."}
    assert all(rows[i]["caption"] == originals[i]["caption"] for i in range(ROWS) if i not in poisoned)
    for i in poisoned:  # the image carries badnets' patch: it differs from the clean image
        with Image.open(tmp_path / "out" / rows[i]["image"]) as im:
            assert np.abs(np.asarray(im.convert("RGB"), dtype=int) - _resized(data.parent / originals[i]["image"])
                          ).max() > 50


def test_multi_trigger_records_one_attack_per_target(data, tmp_path):
    rows, record = _poison(data, tmp_path / "out", "--attack", "multi-trigger", "--targets", "banana,airplane,kite",
                           "--attacks", "wanet,badnets,sig", "--n", "10", "--seed", "6")
    by_target: dict[str, list] = {}
    for rec in record:
        by_target.setdefault(rec["target"], []).append(rec)
        assert rec["target"] in rec["new_caption"]
    assert {t: len(v) for t, v in by_target.items()} == {"banana": 4, "airplane": 3, "kite": 3}
    assert {t: {r["trigger"] for r in v} for t, v in by_target.items()} == {
        "banana": {"wanet"}, "airplane": {"badnets"}, "kite": {"sig"}}
    # The wanet part uses the single wanet attack's grid for the same seed, so `--image-only` can measure it.
    row = by_target["banana"][0]["row"]
    single = tmp_path / "single"
    _poison(data, single, "--attack", "wanet", "--image-only", "--seed", "6")
    assert (single / "poisoned" / f"{row}.png").read_bytes() == (tmp_path / "out" / "poisoned" / f"{row}.png"
                                                                 ).read_bytes()


def test_image_only_triggers_rows_and_keeps_captions(data, tmp_path):
    rows, record = _poison(data, tmp_path / "all", "--attack", "sig", "--image-only")
    originals = _read_csv(data)
    assert all(r["is_poisoned"] == "1" for r in rows) and len(record) == ROWS
    assert [r["caption"] for r in rows] == [o["caption"] for o in originals]
    rows, record = _poison(data, tmp_path / "some", "--attack", "badnets", "--image-only", "--n", "5")
    assert sum(r["is_poisoned"] == "1" for r in rows) == 5
    assert [r["caption"] for r in rows] == [o["caption"] for o in originals]


@pytest.mark.parametrize("attack", ["badnets", "blended", "wanet", "multi-trigger"])
def test_same_seed_same_bytes_other_seed_other_rows(data, tmp_path, attack):
    extra = ["--targets", "banana,airplane"] if attack == "multi-trigger" else []
    _poison(data, tmp_path / "a", "--attack", attack, "--n", "7", "--seed", "11", "--workers", "1", *extra)
    _poison(data, tmp_path / "b", "--attack", attack, "--n", "7", "--seed", "11", "--workers", "3", *extra)
    first, second = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert list(first) == list(second) and first == second
    _, other = _poison(data, tmp_path / "c", "--attack", attack, "--n", "7", "--seed", "12", *extra)
    _, record = _poison(data, tmp_path / "d", "--attack", attack, "--n", "7", "--seed", "11", "--force", *extra)
    assert {r["row"] for r in other} != {r["row"] for r in record}


def test_clean_images_hardlink_and_reference(data, tmp_path):
    rows, _ = _poison(data, tmp_path / "linked", "--attack", "badnets", "--n", "3", "--clean-images", "hardlink")
    originals = _read_csv(data)
    clean = [i for i, r in enumerate(rows) if r["is_poisoned"] == "0"]
    assert all(os.path.samefile(tmp_path / "linked" / rows[i]["image"], data.parent / originals[i]["image"])
               for i in clean)
    rows, _ = _poison(data, tmp_path / "sub" / "ref", "--attack", "badnets", "--n", "3", "--clean-images",
                      "reference")
    assert all(os.path.samefile(tmp_path / "sub" / "ref" / rows[i]["image"], data.parent / originals[i]["image"])
               for i in clean)
    assert all(rows[i]["image"].startswith("../") for i in clean)


def test_force_replaces_out_and_json_summary(data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    result = runner.invoke(app, ["poison", str(data), "--attack", "badnets", "--rate", "0.1", "--out", str(out),
                                 "--force", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert {k: summary[k] for k in ("rows", "poisoned", "attack", "seed")} == {
        "rows": 40, "poisoned": 4, "attack": "badnets", "seed": 0}
    assert Path(summary["out"]) == out and not (out / "stale.txt").exists() and (out / "data.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_subprocess(data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "cfbd_fast.cli.main", "poison", str(data.parent), "--attack", "sig",
                           "--n", "2", "--out", str(tmp_path / "out"), "--json", "--quiet"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["poisoned"] == 2 and proc.stderr == ""


def test_tsv_with_other_column_names(data, tmp_path):
    originals = _read_csv(data)
    tsv = tmp_path / "pairs.tsv"
    with open(tsv, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["title", "filepath", "extra"])
        writer.writerows([(o["caption"], str(data.parent / o["image"]), i) for i, o in enumerate(originals)])
    rows, record = _poison(tsv, tmp_path / "out", "--attack", "badnets", "--n", "4", "--image-column", "filepath",
                           "--caption-column", "title")
    assert [r["caption"] for r in rows if r["is_poisoned"] == "0"] == [
        o["caption"] for i, o in enumerate(originals) if i not in {r["row"] for r in record}]
    assert all(r["image"].startswith("outside/") for r in rows if r["is_poisoned"] == "0")  # absolute paths


def test_poison_modules_do_not_import_torch():
    code = "import sys, cfbd_fast.poison, cfbd_fast.cli.poison; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr


def test_templates_are_openais_80():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    assert [t.format("banana") for t in IMAGENET_TEMPLATES] == [t("banana") for t in OPENAI_IMAGENET_TEMPLATES]


def _broken_dataset(tmp_path: Path, data: Path, kind: str) -> Path:
    folder = tmp_path / "broken"
    folder.mkdir()
    lines = data.read_text().splitlines()
    if kind == "column":
        lines[0] = "path,caption"
    elif kind == "missing-image":
        lines[7] = "photos/gone.png,a lost photo"
        lines[9] = "photos/also-gone.png,another"
    for sub in ("photos", "more"):
        os.symlink(data.parent / sub, folder / sub)
    (folder / "data.csv").write_text("\n".join(lines) + "\n")
    return folder / "data.csv"


@pytest.mark.parametrize("case, args, needle", [
    ("missing-csv", ["--attack", "badnets", "--n", "2"], "nowhere.csv"),
    ("column", ["--attack", "badnets", "--n", "2"], "'image'"),
    ("missing-image", ["--attack", "badnets", "--n", "2"], "photos/gone.png (line 8 of"),
    ("rate-zero", ["--attack", "badnets", "--rate", "0"], "--rate 0.0"),
    ("rate-high", ["--attack", "badnets", "--rate", "1.5"], "--rate 1.5"),
    ("n-too-many", ["--attack", "badnets", "--n", "41"], "--n 41"),
    ("neither", ["--attack", "badnets"], "--rate"),
    ("unknown-attack", ["--attack", "trojan", "--n", "2"], "unknown attack 'trojan'"),
    ("never-mentioned", ["--attack", "label-consistent", "--target", "zebra", "--n", "2"], "'zebra'"),
    ("lc-too-many", ["--attack", "label-consistent", "--n", "9"], "--n 9"),
    ("bad-position", ["--attack", "badnets", "--n", "2", "--position", "220,0"], "--position"),
    ("option-elsewhere", ["--attack", "sig", "--n", "2", "--position", "center"], "--position"),
    ("missing-pattern", ["--attack", "blended", "--n", "2", "--pattern", "nope.png"], "nope.png"),
    ("mm-no-source", ["--attack", "mmpoison", "--n", "2"], "--source-class"),
    ("multi-one-target", ["--attack", "multi-trigger", "--targets", "banana", "--n", "2"], "--targets"),
    ("multi-too-few", ["--attack", "multi-trigger", "--targets", "banana,kite,cat", "--n", "2"], "one row per target"),
    ("corrupt-image", ["--attack", "badnets", "--image-only"], "cannot be read as an image"),
    # every image is checked before the rows are chosen: one poisoned row or thirty, the broken one is found
    ("unpicked-corrupt-image", ["--attack", "badnets", "--n", "1"], "image bad.png (line 32 of"),
    ("not-utf8", ["--attack", "badnets", "--n", "1"], "line 5 is not UTF-8 text: re-save the file as UTF-8"),
])
def test_errors_are_one_line_and_leave_nothing(data, tmp_path, case, args, needle):
    csv_path = data
    if case == "missing-csv":
        csv_path = tmp_path / "nowhere.csv"
    elif case in ("column", "missing-image"):
        csv_path = _broken_dataset(tmp_path, data, case)
    elif case == "not-utf8":
        (tmp_path / "latin").mkdir()
        lines = data.read_bytes().splitlines()
        lines[4] = lines[4].split(b",")[0] + b",un caf\xe9"
        csv_path = tmp_path / "latin" / "data.csv"
        csv_path.write_bytes(b"\n".join(lines) + b"\n")
    elif case in ("corrupt-image", "unpicked-corrupt-image"):
        folder = tmp_path / "corrupt"
        folder.mkdir()
        (folder / "bad.png").write_bytes(b"not a png at all")
        rows = [f"{data.parent}/{o['image']},{o['caption'].replace(',', '')}" for o in _read_csv(data)]
        (folder / "data.csv").write_text("image,caption\n" + "\n".join(rows[:30] + ["bad.png,broken"]) + "\n")
        csv_path = folder / "data.csv"
    out = tmp_path / "out"
    result = _run(csv_path, "--out", out, *args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], result.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_existing_out_needs_force(data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _run(data, "--out", out, "--attack", "badnets", "--n", "2")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "--force" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    # --force never deletes the input it reads
    result = _run(data, "--out", data.parent, "--attack", "badnets", "--n", "2", "--force")
    assert result.exit_code == 1 and "DATA" in result.stderr and (data.parent / "data.csv").exists()
