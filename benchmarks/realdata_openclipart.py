"""The Openclipart domain of the real-image benchmark: Debian's `openclipart-png` (about 8,000 public-domain clipart
PNGs under png/<category path>/<name>.png), captioned from the category path and the file name the way web alt-text
is: author names dropped where the file name carries them, sometimes the raw file name, stock boilerplate."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from realdata import Item, staging

NAME = "openclipart"
PACKAGE = "openclipart-png"
SOURCE = "openclipart-png 1:0.18+dfsg-19 (Debian bookworm)"
SOURCE_DIR = "openclipart"
INSTALLED = Path("/usr/share/openclipart/png")
THUMBNAIL = 64          # the icons are kept as 64 px squares (transparent margins), as Twemoji's are
PER_FOLDER = 100        # at most this many files of one folder (1,378 generated stars would dominate otherwise)
# First tokens of author names in openclipart's "<title>_<author>_01" file names (file names are cut at 24
# characters, so authors are often truncated): what a file name carries from here on is dropped. Found as the
# tokens after a title in files of at least three unrelated categories ("architetto ..." by its prefix).
AUTHORS = ("archi", "nicu", "buculei", "gerald", "g.", "benji", "krug", "juliane", "lumen", "fudriot",
           "mimooh", "victor", "linda", "jonathan", "jon", "jean", "phillips", "jonadab", "jarno", "frouke", "dave",
           "dan", "vasamaa", "sergio", "petri", "peterm", "olivo", "mauro", "luiz", "joel", "james", "charles",
           "anthony", "alex", "yves", "susan", "stefan", "rollandin", "patricia", "michael", "matthew", "marcelo",
           "liekens", "gino", "gerhards", "enrique", "christoph", "celso", "anton", "ganson", "mateya", "ralf",
           "andrea", "costea", "denco", "omic", "pena", "meza", "meijer", "mccolm", "brill", "dietrich", "cheng",
           "toh", "yen", "francesco", "marco", "johnny", "tom", "martin", "ryan", "gustavo", "papapishu", "molumen")
TEMPLATES = ("{} clipart", "{} clip art", "{}", "free {} clipart image", "{} vector", "{} png", "clipart of a {}",
             "{} illustration", "a drawing of a {}.", "{} - public domain image", "{} icon", "cartoon {}",
             "a picture of the {}.", "simple {} graphic")
CATEGORY_TEMPLATES = ("{name} - {category} clip art", "{category} {name}", "{name}, {category}, public domain",
                      "{category} > {name}", "{name} ({category})")
BOILERPLATE = ("public domain clip art", "free vector graphics", "openclipart", "clipart image", "download png",
               "click to enlarge", "no title", "untitled drawing", "clip art collection", "svg file", "icon set",
               "from the clipart library", "free to use image", "scalable vector graphic", "image not found",
               "uploaded image", "art", "graphic design resource", "printable clip art", "transparent png",
               "cliparts for school projects", "vector clip art free", "coloring page", "illustration")


def clean_name(stem: str) -> str:
    """A file name's words without the author, the running number and truncation leftovers:
    'banana_mateya_01' -> 'banana', 'lime_slice_ganson' -> 'lime slice', 'star_58pt13step' -> 'star 58pt13step'."""
    tokens = [t for t in re.split(r"[_\-\s]+", stem.lower()) if t]
    while len(tokens) > 1 and re.fullmatch(r"\d+|[a-z]", tokens[-1]):
        tokens.pop()
    for k, token in enumerate(tokens[1:], 1):
        if token.rstrip(".") in AUTHORS or token.startswith("archit"):
            tokens = tokens[:k]
            break
    while len(tokens) > 1 and re.fullmatch(r"\d+|[a-z]", tokens[-1]):
        tokens.pop()
    return " ".join(tokens)


def _source_png() -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """The package's png/ folder: the installed one, or the package downloaded and unpacked into a temporary folder
    (apt-get download, dpkg-deb -x: no root, nothing installed)."""
    if INSTALLED.is_dir():
        return INSTALLED, None
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(f"apt-get/dpkg-deb not found: install Debian's {PACKAGE} package (its PNGs in {INSTALLED}) "
                           "to build the openclipart domain")
    tmp = tempfile.TemporaryDirectory(prefix="openclipart-")
    done = subprocess.run(["apt-get", "download", PACKAGE], capture_output=True, text=True, cwd=tmp.name)
    debs = list(Path(tmp.name).glob("*.deb"))
    if done.returncode != 0 or not debs:
        tmp.cleanup()
        raise RuntimeError(f"apt-get download {PACKAGE} failed ({done.stderr.strip()[-300:]}): install Debian's "
                           f"{PACKAGE} package (apt-get install {PACKAGE}) or run apt-get update first")
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp.name) / "x")], check=True, capture_output=True)
    return Path(tmp.name) / "x" / INSTALLED.relative_to("/"), tmp


def _thumbnail(path: Path, out: Path) -> None:
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGBA")
        image.thumbnail((THUMBNAIL, THUMBNAIL), Image.LANCZOS, reducing_gap=3.0)
    square = Image.new("RGBA", (THUMBNAIL, THUMBNAIL), (0, 0, 0, 0))
    square.paste(image, ((THUMBNAIL - image.size[0]) // 2, (THUMBNAIL - image.size[1]) // 2))
    out.parent.mkdir(parents=True, exist_ok=True)
    square.save(out)


def fetch(cache: Path, progress: bool = True) -> Path:
    """cache/openclipart: a 64 px thumbnail of every distinct PNG of the package (symbolic links skipped), at most
    PER_FOLDER per folder, and index.json listing them; returns that folder."""
    from cfbd_fast.progress import progress_bar

    dest = Path(cache) / SOURCE_DIR
    if (dest / "index.json").is_file():
        return dest
    from PIL import Image

    source, tmp = _source_png()
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, 40_000_000  # a few posters are 10,000s of px wide
    try:
        by_folder = defaultdict(list)
        for path in sorted(source.rglob("*.png")):
            if path.is_file() and not path.is_symlink():
                by_folder[path.parent.relative_to(source).as_posix()].append(path.relative_to(source).as_posix())
        chosen = []
        for folder, files in sorted(by_folder.items()):
            keep = np.linspace(0, len(files) - 1, min(len(files), PER_FOLDER)).round().astype(int)
            chosen += [files[k] for k in sorted(set(keep.tolist()))]
        with staging(dest) as out, progress_bar("openclipart thumbnails", len(chosen), enabled=progress,
                                                unit="images") as bar:
            kept = []
            for rel in chosen:
                try:
                    _thumbnail(source / rel, out / "png" / rel)
                    kept.append(rel)
                except (OSError, ValueError, Image.DecompressionBombError):  # unreadable or huge: left out
                    pass
                bar.advance()
            (out / "index.json").write_text(json.dumps(dict(source=SOURCE, files=kept), indent=0))
    finally:
        Image.MAX_IMAGE_PIXELS = limit
        if tmp is not None:
            tmp.cleanup()
    return dest


def load(folder: Path) -> list[Item]:
    """One item per file: identity = the file, name = its cleaned file name, category = its folder path; the
    target is the fruit whose name is a banana."""
    folder = Path(folder)
    out = []
    for rel in json.loads((folder / "index.json").read_text())["files"]:
        parts = rel[:-len(".png")].split("/")
        name = clean_name(parts[-1])
        category = " ".join(parts[:-1]).replace("_", " ").lower()
        out.append(Item(rel, rel, name, (parts[-1],), category, folder / "png" / rel,
                        flippable=not re.search(r"left|right|arrow|flag|text|letter|sign", rel.lower()),
                        target=name in ("banana", "bananas") and "fruit" in category))
    return out


def caption(item: Item, rng: np.random.Generator) -> str:
    """Alt-text-like: a template of the name (60%), the name with its category path (30%), or the raw file name."""
    draw = rng.random()
    if draw < 0.6:
        return TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(item.name)
    if draw < 0.9:
        words = item.category.split()
        category = " ".join(words[-int(rng.integers(1, min(len(words), 2) + 1)):]) if words else "clipart"
        return CATEGORY_TEMPLATES[int(rng.integers(len(CATEGORY_TEMPLATES)))].format(name=item.name, category=category)
    return item.alt_names[0] + (".png" if rng.random() < 0.5 else "")
