"""Real-image benchmark material, one builder for every image domain: icons (Twemoji: realdata_twemoji.py;
Openclipart: realdata_openclipart.py) captioned from their names, made web-like, in CleanCLIP CSV parts, plus dual
encoders trained on them (realdata_tower.py).

Parts of a domain (each `data.csv` with columns image,caption, paths relative to the CSV, and a row-aligned
`labels.csv`), in .cache/realdata/<domain>/:
  train       trains the image towers; leaves out the held-back `novel` identities (about 10% of them).
  mapper      a clean part for fitting a mapping network.
  scan-<N>    the clean base sets (N pairs: 2,000 and 10,000) that attacks are applied to: the domain's captions,
              boilerplate caption groups (10-40 different icons under one stock caption, 20 per 10,000 pairs) and
              genuine banana pairs with natural captions (train and mapper hold such pairs too: the attack target
              is a common concept, as on the web).
  test        one image per identity, captioned "a photo of a {name}.", for retrieval and attack-success measurement.
Identities are shared between parts (train excepted for `novel` ones); every row is its own random rendering
(size, crop, rotation, colour, background, JPEG quality), so no image file occurs twice anywhere.
Usage: python benchmarks/realdata.py [--domain twemoji openclipart] [--sizes 2000 10000] [--small] [--retrain]
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import importlib
import io
import json
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cfbd_fast.progress import progress_bar  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE_ROOT = ROOT / ".cache" / "realdata"
SMALL_CACHE_ROOT = ROOT / ".cache" / "realdata-small"
DOMAINS = ("twemoji", "openclipart")
DEFAULT_CACHE = CACHE_ROOT / "twemoji"
SMALL_CACHE = SMALL_CACHE_ROOT / "twemoji"
PART_INDEX = {"train": 0, "mapper": 1, "scan": 2, "test": 3}  # seeds each part's plan and renderings
TARGET = "banana"
BANANA_CAPTIONS = ("a ripe yellow banana", "banana on a plain background", "fresh banana fruit",
                   "a single banana, cartoon style", "banana clip art for a fruit poster",
                   "healthy snack: one banana", "yellow banana illustration", "the banana is ripe and sweet",
                   "banana icon for a grocery app", "a banana drawn in a flat style", "my favourite fruit, a banana",
                   "one banana for breakfast")


@dataclass(frozen=True)
class DataSpec:
    """How many rows each part gets and how the special rows are laid out."""
    train: int
    mapper: int
    scan_sizes: tuple[int, ...]            # one scan part per size; the first is what tests use
    identities: int | None = None          # base identities used (None: all); the target's are always among them
    novel_fraction: float = 0.1            # identities kept out of `train`
    groups_per_10k: int = 20               # boilerplate groups per 10,000 scan pairs; mapper and train get fewer
    group_size: tuple[int, int] = (10, 40)
    bananas_per_10k: int = 30              # natural-caption banana pairs per 10,000 scan pairs (mapper: a third)
    train_banana_pairs: int = 200          # ... and in train: the target is a common concept on the web


FULL = DataSpec(train=12000, mapper=4000, scan_sizes=(2000, 10000))
SMALL = DataSpec(train=1000, mapper=300, scan_sizes=(600,), identities=120, groups_per_10k=67, group_size=(5, 10),
                 bananas_per_10k=100, train_banana_pairs=30)


@dataclass(frozen=True)
class Item:
    """One source image of a domain and the names its captions use."""
    code: str        # unique key of this image
    identity: str    # what it depicts (Twemoji: the base emoji of skin-tone variants; Openclipart: the file)
    name: str        # canonical caption name, e.g. "father christmas, light skin tone"
    alt_names: tuple[str, ...]
    category: str
    png: Path
    flippable: bool = False
    target: bool = False  # depicts the attack target (a banana)


def domain(name: str):
    """The module of a domain (fetch, load, caption, BOILERPLATE, SOURCE, SOURCE_DIR)."""
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}: choose one of {', '.join(DOMAINS)}")
    return importlib.import_module(f"realdata_{name}")


def scan_part(size: int) -> str:
    return f"scan-{size}"


def part_names(spec: DataSpec, sizes: tuple[int, ...] | None = None) -> tuple[str, ...]:
    return ("train", "mapper", *(scan_part(n) for n in (sizes or spec.scan_sizes)), "test")


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


def _choose_identities(items: list[Item], spec: DataSpec, seed: int) -> tuple[list[str], set[str]]:
    """The identities used, and the `novel` subset that train never sees (never a target)."""
    targets = list(dict.fromkeys(e.identity for e in items if e.target))
    identities = list(dict.fromkeys(e.identity for e in items))
    rng = np.random.default_rng([seed, 99])
    if spec.identities is not None and spec.identities < len(identities):
        others = [i for i in identities if i not in targets]
        picked = set(rng.choice(len(others), spec.identities - len(targets), replace=False).tolist())
        identities = targets + [i for k, i in enumerate(others) if k in picked]
    candidates = [i for i in identities if i not in targets]
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


def render(item: Item, seed: tuple[int, ...], distractors: list[Item] = ()) -> bytes:
    """One web-like JPEG of `item`: random size, background, scale, rotation, colour, flip, quality."""
    rng = np.random.default_rng(seed)
    side = int(rng.integers(96, 161))
    canvas = _background(rng, side)
    if distractors and rng.random() < 0.1:  # a small second icon in the picture, as web images often have
        other = distractors[int(rng.integers(len(distractors)))]
        _place(canvas, other.png, rng, (0.2, 0.3), False)
    _place(canvas, item.png, rng, (0.45, 0.95), item.flippable)
    buffer = io.BytesIO()
    canvas.save(buffer, "JPEG", quality=int(rng.integers(70, 96)))
    return buffer.getvalue()


def _plan_part(part: str, items: list[Item], novel: set[str], spec: DataSpec, seed: int, dom) -> list[dict]:
    """The rows of one part: which item, which caption, what kind (plain, boilerplate, banana, test)."""
    kind, size = (part.split("-") + [""])[:2]
    if kind == "test":
        return [dict(item=e, caption=f"a photo of a {e.name}.", kind="test", group=-1)
                for e in items if e.code == e.identity]
    # the 10,000-pair scan part keeps the plan of the earlier single scan part
    rng = np.random.default_rng([seed, PART_INDEX[kind]] + ([int(size)] if kind == "scan" and size != "10000" else []))
    targets = [e for e in items if e.target]
    pool = [e for e in items if part != "train" or e.identity not in novel]
    size = {"train": spec.train, "mapper": spec.mapper}.get(kind) or int(size)
    # train and mapper get fewer groups and bananas per row than a scan part (full spec: 10 and 4 groups)
    share = {"train": 1 / 2.4, "mapper": 1 / 2}.get(kind, 1.0)
    n_groups = max(1 if share < 1 else 2, int(round(share * spec.groups_per_10k * size / 10000)))
    rows = []
    captions = rng.permutation(len(dom.BOILERPLATE))
    for group in range(n_groups):
        members = rng.choice(len(pool), int(rng.integers(spec.group_size[0], spec.group_size[1] + 1)), replace=False)
        rows += [dict(item=pool[m], caption=dom.BOILERPLATE[captions[group % len(dom.BOILERPLATE)]],
                      kind="boilerplate", group=group) for m in members]
    n_bananas = spec.train_banana_pairs if kind == "train" else max(2, int(round(
        spec.bananas_per_10k * size / (12000 if kind == "mapper" else 10000))))
    for _ in range(n_bananas):
        item = targets[int(rng.integers(len(targets)))] if len(targets) > 1 else targets[0]
        rows.append(dict(item=item, caption=BANANA_CAPTIONS[int(rng.integers(len(BANANA_CAPTIONS)))], kind="banana",
                         group=-1))
    if len(rows) > size:
        raise ValueError(f"{part}: {size} rows cannot hold {len(rows)} boilerplate and banana rows; raise its size")
    order = np.concatenate([rng.permutation(len(pool)) for _ in range(-(-size // len(pool)))])
    rows += [dict(item=pool[k], caption=dom.caption(pool[k], rng), kind="plain", group=-1)
             for k in order[:size - len(rows)]]
    return [rows[k] for k in rng.permutation(len(rows))]


def load_items(cache: Path, dom, progress: bool = True) -> list[Item]:
    return dom.load(dom.fetch(cache) if dom.NAME == "twemoji" else dom.fetch(cache, progress=progress))


def build_dataset(cache: Path, spec: DataSpec = FULL, parts: tuple[str, ...] | None = None, seed: int = 0,
                  progress: bool = True, domain_name: str = "twemoji") -> dict[str, Path]:
    """Write the parts that are missing (or built from another spec/seed) under cache/; returns part -> data.csv."""
    cache, dom = Path(cache), domain(domain_name)
    items = load_items(cache, dom, progress)
    identities, novel = _choose_identities(items, spec, seed)
    kept = set(identities)
    items = [e for e in items if e.identity in kept]
    record = json.loads(json.dumps(dict(spec=asdict(spec), seed=seed, package=dom.SOURCE)))  # as stored
    out = {}
    for part in parts or part_names(spec):
        folder = cache / part
        if (folder / "data.csv").is_file() and _read_json(folder / "build.json") == dict(record, part=part):
            out[part] = folder / "data.csv"
            continue
        rows = _plan_part(part, items, novel, spec, seed, dom)
        distractors = [e for e in items if not e.target and (part != "train" or e.identity not in novel)]
        kind, _, size = part.partition("-")
        key = (seed, PART_INDEX[kind]) + ((int(size),) if size and size != "10000" else ())
        with staging(folder) as tmp, progress_bar(f"rendering {dom.NAME} {part}", len(rows), enabled=progress,
                                                  unit="images") as bar:
            (tmp / "images").mkdir()
            for k, row in enumerate(rows):
                row["image"] = f"images/{k:06d}.jpg"
                (tmp / row["image"]).write_bytes(render(row["item"], key + (k,), distractors))
                bar.advance()
            _write_csv(tmp / "labels.csv", ["image", "caption", "emoji", "identity", "name", "category", "kind",
                                            "group", "novel"],
                       [[r["image"], r["caption"], r["item"].code, r["item"].identity, r["item"].name,
                         r["item"].category, r["kind"], r["group"], int(r["item"].identity in novel)] for r in rows])
            (tmp / "build.json").write_text(json.dumps(dict(record, part=part), indent=1))
            _write_csv(tmp / "data.csv", ["image", "caption"], [[r["image"], r["caption"]] for r in rows])
        out[part] = folder / "data.csv"
    return out


def read_labels(part_dir: Path) -> list[dict]:
    """The rows of a part's labels.csv (row-aligned with its data.csv; column `emoji` is the item's key)."""
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


def ensure_all(cache: Path | None = None, small: bool = False, seed: int = 0, progress: bool = True,
               retrain: bool = False, domain_name: str = "twemoji", sizes: tuple[int, ...] | None = None,
               towers: tuple[str, ...] = ("full",)) -> dict:
    """Build whatever is missing of one domain: its source images, the parts (scan parts of `sizes`, default the
    first size), the trained towers; returns their paths (`parts["scan"]`: the first size), `models` (tower ->
    folder; `model`: the first) and each tower's test retrieval figures."""
    from realdata_tower import evaluate_retrieval, train_image_tower

    spec = SMALL if small else FULL
    sizes = tuple(sizes or spec.scan_sizes[:1])
    cache = Path(cache) if cache is not None else (SMALL_CACHE_ROOT if small else CACHE_ROOT) / domain_name
    seconds = {}
    start = time.perf_counter()
    parts = build_dataset(cache, spec, part_names(spec, sizes), seed=seed, progress=progress, domain_name=domain_name)
    parts["scan"] = parts[scan_part(sizes[0])]
    seconds["dataset"] = time.perf_counter() - start
    models, retrieval = {}, {}
    for tower in towers:
        begun = time.perf_counter()
        models[tower] = train_image_tower(cache, small=small, seed=seed, progress=progress, retrain=retrain,
                                          tower=tower, domain_name=domain_name)
        retrieval[tower] = evaluate_retrieval(models[tower], cache / "test", progress=progress)
        seconds[f"tower {tower}"] = time.perf_counter() - begun
    return dict(cache=cache, domain=domain_name, parts=parts, models=models, model=models[towers[0]],
                retrievals=retrieval, retrieval=retrieval[towers[0]], seconds=seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", nargs="*", default=list(DOMAINS), choices=DOMAINS)
    parser.add_argument("--sizes", type=int, nargs="*", default=None,
                        help="scan part sizes (default: the first, 2,000 pairs; the benchmark adds 10000)")
    parser.add_argument("--towers", nargs="*", default=["full", "weak"], choices=("full", "weak"))
    parser.add_argument("--small", action="store_true", help="the test-size variant (.cache/realdata-small)")
    parser.add_argument("--cache", type=Path, default=None, help="one domain's folder (default .cache/realdata/DOMAIN)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain", action="store_true",
                        help="train the image towers even where the shipped weights (benchmarks/data/) fit")
    parser.add_argument("--ship", action="store_true",
                        help="copy the towers' weights to benchmarks/data/ (after --retrain: the new shipped model)")
    args = parser.parse_args(argv)
    for name in args.domain:
        try:
            result = ensure_all(args.cache, small=args.small, seed=args.seed, retrain=args.retrain, domain_name=name,
                                sizes=tuple(args.sizes) if args.sizes else None, towers=tuple(args.towers))
        except RuntimeError as exc:  # a missing tool: one line saying what to install
            sys.exit(f"Error: {name}: {exc}")
        for part, path in result["parts"].items():
            if part != "scan":
                print(f"{name:11s} {part:11s} {sum(1 for _ in open(path)) - 1:6d} pairs  {path}")
        for tower, folder in result["models"].items():
            if args.ship:
                from realdata_tower import ship_tower

                print(f"{name:11s} tower {tower}: shipped as {ship_tower(folder, name, tower)}")
            r = result["retrievals"][tower]
            print(f"{name:11s} tower {tower}: local-dir:{folder}; test retrieval image->caption over {r['captions']} "
                  f"captions: R@1 {r['r1']:.3f}  R@5 {r['r5']:.3f}  (seen R@1 {r['seen_r1']:.3f}, novel R@1 "
                  f"{r['novel_r1']:.3f}; chance R@1 {1 / r['captions']:.4f})")
        print(f"{name:11s} seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items()))


if __name__ == "__main__":
    main()
