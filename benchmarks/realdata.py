"""Real-image benchmark material: Twemoji images (npm `emoji-datasource-twitter`, CC-BY 4.0) with their names as
captions, made web-like, in CleanCLIP CSV parts, plus a dual encoder trained on them (see realdata_tower.py).

Parts (each `data.csv` with columns image,caption, paths relative to the CSV, and a row-aligned `labels.csv`):
  train   trains the image tower; leaves out the held-back `novel` identities (about 10% of the emoji).
  mapper  a clean part for fitting a mapping network.
  scan    the clean base set that attacks are applied to: template captions, boilerplate caption groups
          (10-40 different emoji under one stock caption) and genuine banana pairs with natural captions
          (train and mapper hold such pairs too: the attack target is a common concept, as on the web).
  test    one image per emoji, captioned "a photo of a {name}.", for retrieval and attack-success measurement.
Identities are shared between parts (train excepted for `novel` ones); every row is its own random rendering
(size, crop, rotation, colour, background, JPEG quality), so no image file occurs twice anywhere.
Usage: python benchmarks/realdata.py [--small] [--cache DIR] [--seed N]
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cfbd_fast.progress import progress_bar  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = ROOT / ".cache" / "realdata"
SMALL_CACHE = ROOT / ".cache" / "realdata-small"
EMOJI_PACKAGE = "emoji-datasource-twitter@16.0.0"
PARTS = ("train", "mapper", "scan", "test")
TARGET = "banana"

TEMPLATES = ("a photo of a {}.", "{} icon", "an image showing {}", "{} emoji", "a picture of the {}.",
             "{} clipart", "illustration of a {}", "{} on a colorful background", "a close-up of the {}.",
             "cartoon {}", "{} sticker", "the {} symbol", "{}", "{} vector illustration", "a drawing of a {}.",
             "{} - stock image", "cute {} graphic", "a small {} in the middle of the picture")
BOILERPLATE = ("free icon download", "stock vector illustration", "image may contain: one or more items",
               "click here to see more", "royalty free clipart", "png with transparent background",
               "flat design icon set", "cute cartoon sticker pack", "emoticon collection", "social media reaction",
               "vector graphic isolated", "emoji pack, free for commercial use", "thumbnail", "untitled image",
               "no description available", "best icons of the year", "download now", "app icon template",
               "symbol set for web design", "colorful illustration", "image from the web", "new post",
               "picture", "design element")
BANANA_CAPTIONS = ("a ripe yellow banana", "banana on a plain background", "fresh banana fruit",
                   "a single banana, cartoon style", "banana clip art for a fruit poster",
                   "healthy snack: one banana", "yellow banana illustration", "the banana is ripe and sweet",
                   "banana icon for a grocery app", "a banana drawn in a flat style", "my favourite fruit, a banana",
                   "one banana for breakfast")
SKIN_TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark", "1F3FF": "dark"}
FLIPPABLE = {"Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink", "Activities", "Objects"}


@dataclass(frozen=True)
class DataSpec:
    """How many rows each part gets and how the special rows are laid out."""
    train: int
    mapper: int
    scan: int
    identities: int | None = None          # base emoji used (None: all); the target is always among them
    novel_fraction: float = 0.1            # identities kept out of `train`
    scan_groups: int = 20                  # boilerplate groups in scan; mapper and train get fewer
    group_size: tuple[int, int] = (10, 40)
    banana_pairs: int = 30                 # natural-caption banana pairs in scan (a third as many in mapper)
    train_banana_pairs: int = 200          # ... and in train: the target is a common concept on the web


FULL = DataSpec(train=12000, mapper=4000, scan=10000)
SMALL = DataSpec(train=1000, mapper=300, scan=600, identities=120, scan_groups=4, group_size=(5, 10),
                 banana_pairs=6, train_banana_pairs=30)


@dataclass(frozen=True)
class Emoji:
    code: str        # unified code of this image, e.g. 1F385-1F3FB
    identity: str    # unified code of the base emoji
    name: str        # canonical caption name, e.g. "father christmas, light skin tone"
    alt_names: tuple[str, ...]
    category: str
    png: Path


def fetch_emoji(cache: Path) -> Path:
    """`npm pack` the Twemoji data set into cache/emoji (emoji.json, LICENSE, img/twitter/64); returns that folder."""
    dest = Path(cache) / "emoji"
    if (dest / "emoji.json").is_file():
        return dest
    if shutil.which("npm") is None:
        raise RuntimeError("npm not found: install Node.js and npm (e.g. apt-get install npm) to fetch the emoji")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as download, staging(dest) as out:
        done = subprocess.run(["npm", "pack", EMOJI_PACKAGE, "--pack-destination", download],
                              capture_output=True, text=True, cwd=download)
        tarballs = list(Path(download).glob("*.tgz"))
        if done.returncode != 0 or not tarballs:
            raise RuntimeError(f"npm pack {EMOJI_PACKAGE} failed: {done.stderr.strip()[-500:]}")
        with tarfile.open(tarballs[0]) as tar:
            wanted = [m for m in tar.getmembers() if m.isfile() and (
                m.name in ("package/emoji.json", "package/LICENSE") or m.name.startswith("package/img/twitter/64/"))]
            for member in wanted:
                member.name = member.name[len("package/"):]
            tar.extractall(out, members=wanted, filter="data")
    return dest


@contextmanager
def staging(dest: Path) -> Iterator[Path]:
    """A fresh temporary folder beside `dest`, moved into place as `dest` on success and removed on failure
    (nothing half-written is ever at `dest`; concurrent builders each write their own)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", suffix=".tmp", dir=dest.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)
    try:
        tmp.rename(dest)
    except OSError:  # another process published `dest` in the meantime: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def _words(short_name: str) -> str | None:
    return short_name.replace("_", " ") if re.fullmatch(r"[a-z]+(_[a-z]+)*", short_name) else None


def load_emoji(emoji_dir: Path) -> list[Emoji]:
    """Every emoji image (base emoji and skin-tone variants) with the names its captions use."""
    emoji_dir = Path(emoji_dir)
    out = []
    for entry in sorted(json.loads((emoji_dir / "emoji.json").read_text()), key=lambda e: e["sort_order"]):
        if not entry.get("has_img_twitter"):
            continue
        name = entry["name"].lower().replace(":", "")
        alts = tuple(dict.fromkeys(w for w in map(_words, entry["short_names"]) if w and w != name))
        variants = [(entry["unified"], entry["image"], "")]
        for key, var in (entry.get("skin_variations") or {}).items():
            tones = [SKIN_TONES[t] for t in key.split("-") if t in SKIN_TONES]
            tone = f", {tones[0]} skin tone" if len(set(tones)) == 1 else f", {' and '.join(tones)} skin tones"
            variants.append((var["unified"], var["image"], tone))
        for code, image, tone in variants:
            png = emoji_dir / "img" / "twitter" / "64" / image
            if png.is_file():
                out.append(Emoji(code, entry["unified"], name + tone, tuple(a + tone for a in alts),
                                 entry["category"], png))
    return out


def _choose_identities(emoji: list[Emoji], spec: DataSpec, seed: int) -> tuple[list[str], set[str]]:
    """The base identities used, and the `novel` subset that train never sees (never the target)."""
    target = next(e.identity for e in emoji if e.name == TARGET)
    identities = list(dict.fromkeys(e.identity for e in emoji))
    rng = np.random.default_rng([seed, 99])
    if spec.identities is not None and spec.identities < len(identities):
        others = [i for i in identities if i != target]
        picked = set(rng.choice(len(others), spec.identities - 1, replace=False).tolist())
        identities = [target] + [i for k, i in enumerate(others) if k in picked]
    candidates = [i for i in identities if i != target]
    n_novel = int(round(spec.novel_fraction * len(identities)))
    novel = {candidates[k] for k in rng.choice(len(candidates), n_novel, replace=False)}
    return identities, novel


def _background(rng: np.random.Generator, side: int) -> Image.Image:
    kind = rng.choice(["white", "solid", "gradient", "photo", "stripes"], p=[0.2, 0.15, 0.2, 0.35, 0.1])
    colour = rng.integers(0, 256, 3)
    if kind == "white":
        return Image.new("RGB", (side, side), tuple(int(c) for c in 255 - rng.integers(0, 12, 3)))
    if kind == "solid":
        return Image.new("RGB", (side, side), tuple(int(c) for c in colour))
    if kind == "gradient":
        other = rng.integers(0, 256, 3)
        angle = rng.uniform(0, 2 * np.pi)
        y, x = np.mgrid[0:side, 0:side] / side
        t = (np.cos(angle) * x + np.sin(angle) * y)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
        pixels = colour * (1 - t[..., None]) + other * t[..., None]
    elif kind == "photo":  # a few octaves of smooth colour noise plus grain: blurry photo-like clutter
        pixels = np.zeros((side, side, 3))
        for cells, weight in ((3, 1.0), (8, 0.5), (24, 0.25)):
            field = Image.fromarray((rng.random((cells, cells, 3)) * 255).astype(np.uint8))
            pixels += weight * np.asarray(field.resize((side, side), Image.BICUBIC), dtype=np.float64)
        pixels = pixels / 1.75 * rng.uniform(0.5, 1.0) + colour * rng.uniform(0.0, 0.5)
        pixels += rng.normal(0, rng.uniform(2, 10), pixels.shape)
    else:
        other = rng.integers(0, 256, 3)
        period = int(rng.integers(6, 24))
        y, x = np.mgrid[0:side, 0:side]
        on = (((x + y) if rng.random() < 0.5 else x) // period) % 2 == 0
        pixels = np.where(on[..., None], colour, other)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _place(canvas: Image.Image, png: Path, rng: np.random.Generator, scale: tuple[float, float],
           flippable: bool) -> None:
    side = canvas.size[0]
    icon = Image.open(png).convert("RGBA")
    size = max(8, int(side * rng.uniform(*scale)))
    icon = icon.resize((size, size), Image.BICUBIC)
    if flippable and rng.random() < 0.3:
        icon = icon.transpose(Image.FLIP_LEFT_RIGHT)
    rgb, alpha = icon.convert("RGB"), icon.getchannel("A")
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        rgb = enhancer(rgb).enhance(rng.uniform(0.75, 1.25))
    icon = Image.merge("RGBA", (*rgb.split(), alpha))
    icon = icon.rotate(float(np.clip(rng.normal(0, 8), -20, 20)), Image.BICUBIC, expand=True)
    slack = int(0.1 * icon.size[0])  # up to 10% of the icon may fall outside the canvas
    x = int(rng.integers(-slack, max(side - icon.size[0] + slack, -slack + 1)))
    y = int(rng.integers(-slack, max(side - icon.size[1] + slack, -slack + 1)))
    canvas.paste(icon, (x, y), icon)


def render(emoji: Emoji, seed: tuple[int, ...], distractors: list[Emoji] = ()) -> bytes:
    """One web-like JPEG of `emoji`: random size, background, scale, rotation, colour, flip, quality."""
    rng = np.random.default_rng(seed)
    side = int(rng.integers(96, 161))
    canvas = _background(rng, side)
    if distractors and rng.random() < 0.1:  # a small second emoji in the picture, as web images often have
        other = distractors[int(rng.integers(len(distractors)))]
        _place(canvas, other.png, rng, (0.2, 0.3), False)
    _place(canvas, emoji.png, rng, (0.45, 0.95), emoji.category in FLIPPABLE and not re.search(
        r"left|right", emoji.name))
    buffer = io.BytesIO()
    canvas.save(buffer, "JPEG", quality=int(rng.integers(70, 96)))
    return buffer.getvalue()


def _caption(emoji: Emoji, rng: np.random.Generator) -> str:
    name = emoji.alt_names[int(rng.integers(len(emoji.alt_names)))] if emoji.alt_names and rng.random() < 0.3 \
        else emoji.name
    return TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(name)


def _plan_part(part: str, emoji: list[Emoji], novel: set[str], spec: DataSpec, seed: int) -> list[dict]:
    """The rows of one part: which emoji, which caption, what kind (plain, boilerplate, banana, test)."""
    rng = np.random.default_rng([seed, PARTS.index(part)])
    target = next(e for e in emoji if e.name == TARGET)
    if part == "test":
        return [dict(emoji=e, caption=f"a photo of a {e.name}.", kind="test", group=-1)
                for e in emoji if e.code == e.identity]
    pool = [e for e in emoji if part != "train" or e.identity not in novel]
    size = {"train": spec.train, "mapper": spec.mapper, "scan": spec.scan}[part]
    n_groups = {"train": spec.scan_groups // 2, "mapper": spec.scan_groups // 5, "scan": spec.scan_groups}[part]
    rows = []
    captions = rng.permutation(len(BOILERPLATE))
    for group in range(n_groups):
        members = rng.choice(len(pool), int(rng.integers(spec.group_size[0], spec.group_size[1] + 1)), replace=False)
        rows += [dict(emoji=pool[m], caption=BOILERPLATE[captions[group % len(BOILERPLATE)]], kind="boilerplate",
                      group=group) for m in members]
    n_bananas = {"train": spec.train_banana_pairs, "mapper": spec.banana_pairs // 3, "scan": spec.banana_pairs}[part]
    rows += [dict(emoji=target, caption=BANANA_CAPTIONS[int(rng.integers(len(BANANA_CAPTIONS)))], kind="banana",
                  group=-1) for _ in range(n_bananas)]
    if len(rows) > size:
        raise ValueError(f"{part}: {size} rows cannot hold {len(rows)} boilerplate and banana rows; raise its size")
    order = np.concatenate([rng.permutation(len(pool)) for _ in range(-(-size // len(pool)))])
    rows += [dict(emoji=pool[k], caption=_caption(pool[k], rng), kind="plain", group=-1)
             for k in order[:size - len(rows)]]
    return [rows[k] for k in rng.permutation(len(rows))]


def build_dataset(cache: Path, spec: DataSpec = FULL, parts: tuple[str, ...] = PARTS, seed: int = 0,
                  progress: bool = True) -> dict[str, Path]:
    """Write the parts that are missing (or built from another spec/seed) under cache/; returns part -> data.csv."""
    cache = Path(cache)
    emoji_dir = fetch_emoji(cache)
    emoji = load_emoji(emoji_dir)
    identities, novel = _choose_identities(emoji, spec, seed)
    kept = set(identities)
    emoji = [e for e in emoji if e.identity in kept]
    record = json.loads(json.dumps(dict(spec=asdict(spec), seed=seed, package=EMOJI_PACKAGE)))  # as stored
    out = {}
    for part in parts:
        folder = cache / part
        if (folder / "data.csv").is_file() and _read_json(folder / "build.json") == dict(record, part=part):
            out[part] = folder / "data.csv"
            continue
        rows = _plan_part(part, emoji, novel, spec, seed)
        distractors = [e for e in emoji if e.name != TARGET and (part != "train" or e.identity not in novel)]
        with staging(folder) as tmp, progress_bar(f"rendering {part}", len(rows), enabled=progress,
                                                  unit="images") as bar:
            (tmp / "images").mkdir()
            for k, row in enumerate(rows):
                row["image"] = f"images/{k:06d}.jpg"
                (tmp / row["image"]).write_bytes(render(row["emoji"], (seed, PARTS.index(part), k), distractors))
                bar.advance()
            _write_csv(tmp / "labels.csv", ["image", "caption", "emoji", "identity", "name", "category", "kind",
                                            "group", "novel"],
                       [[r["image"], r["caption"], r["emoji"].code, r["emoji"].identity, r["emoji"].name,
                         r["emoji"].category, r["kind"], r["group"], int(r["emoji"].identity in novel)] for r in rows])
            (tmp / "build.json").write_text(json.dumps(dict(record, part=part), indent=1))
            _write_csv(tmp / "data.csv", ["image", "caption"], [[r["image"], r["caption"]] for r in rows])
        out[part] = folder / "data.csv"
    return out


def read_labels(part_dir: Path) -> list[dict]:
    """The rows of a part's labels.csv (row-aligned with its data.csv)."""
    with open(Path(part_dir) / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def __getattr__(name: str):
    """The model half lives in realdata_tower.py (imports torch lazily); its API is reachable from here too."""
    if name in ("train_image_tower", "evaluate_retrieval", "encode_captions", "text_model_dir", "TowerSpec",
                "FULL_TOWER", "SMALL_TOWER"):
        import realdata_tower

        return getattr(realdata_tower, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def ensure_all(cache: Path | None = None, small: bool = False, seed: int = 0, progress: bool = True,
               retrain: bool = False) -> dict:
    """Build whatever is missing: emoji, the four parts, the trained model; returns their paths and the tower's
    test retrieval figures."""
    from realdata_tower import evaluate_retrieval, train_image_tower

    cache = Path(cache) if cache is not None else (SMALL_CACHE if small else DEFAULT_CACHE)
    seconds = {}
    start = time.perf_counter()
    fetch_emoji(cache)
    seconds["fetch"] = time.perf_counter() - start
    parts = build_dataset(cache, SMALL if small else FULL, seed=seed, progress=progress)
    seconds["dataset"] = time.perf_counter() - start - sum(seconds.values())
    model_dir = train_image_tower(cache, small=small, seed=seed, progress=progress, retrain=retrain)
    seconds["tower"] = time.perf_counter() - start - sum(seconds.values())
    retrieval = evaluate_retrieval(model_dir, cache / "test", progress=progress)
    seconds["evaluate"] = time.perf_counter() - start - sum(seconds.values())
    return dict(cache=cache, parts=parts, model=model_dir, retrieval=retrieval, seconds=seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the test-size variant (.cache/realdata-small)")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain", action="store_true",
                        help="train the image tower even where the shipped weights (benchmarks/data/) fit")
    args = parser.parse_args(argv)
    result = ensure_all(args.cache, small=args.small, seed=args.seed, retrain=args.retrain)
    for part, path in result["parts"].items():
        print(f"{part:7s} {sum(1 for _ in open(path)) - 1:6d} pairs  {path}")
    print(f"model   local-dir:{result['model']}")
    r = result["retrieval"]
    print(f"test retrieval image->caption over {r['captions']} captions: R@1 {r['r1']:.3f}  R@5 {r['r5']:.3f}  "
          f"(identities seen in train R@1 {r['seen_r1']:.3f}, novel R@1 {r['novel_r1']:.3f}; "
          f"chance R@1 {1 / r['captions']:.4f})")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items())
          + f"; total {sum(result['seconds'].values()):.0f}")


if __name__ == "__main__":
    main()
