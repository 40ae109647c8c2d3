"""The Twemoji domain of the real-image benchmark: emoji images (npm `emoji-datasource-twitter`, CC-BY 4.0) with
their names as captions, made web-like by templates and stock boilerplate (see realdata.py for the parts)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from realdata import Item, staging

NAME = "twemoji"
SOURCE = "emoji-datasource-twitter@16.0.0"
SOURCE_DIR = "emoji"
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
SKIN_TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark", "1F3FF": "dark"}
FLIPPABLE = {"Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink", "Activities", "Objects"}


def fetch(cache: Path) -> Path:
    """`npm pack` the Twemoji data set into cache/emoji (emoji.json, LICENSE, img/twitter/64); returns that folder."""
    dest = Path(cache) / SOURCE_DIR
    if (dest / "emoji.json").is_file():
        return dest
    if shutil.which("npm") is None:
        raise RuntimeError("npm not found: install Node.js and npm (e.g. apt-get install npm) to fetch the emoji")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as download, staging(dest) as out:
        done = subprocess.run(["npm", "pack", SOURCE, "--pack-destination", download],
                              capture_output=True, text=True, cwd=download)
        tarballs = list(Path(download).glob("*.tgz"))
        if done.returncode != 0 or not tarballs:
            raise RuntimeError(f"npm pack {SOURCE} failed: {done.stderr.strip()[-500:]}")
        with tarfile.open(tarballs[0]) as tar:
            wanted = [m for m in tar.getmembers() if m.isfile() and (
                m.name in ("package/emoji.json", "package/LICENSE") or m.name.startswith("package/img/twitter/64/"))]
            for member in wanted:
                member.name = member.name[len("package/"):]
            tar.extractall(out, members=wanted, filter="data")
    return dest


def _words(short_name: str) -> str | None:
    return short_name.replace("_", " ") if re.fullmatch(r"[a-z]+(_[a-z]+)*", short_name) else None


def load(emoji_dir: Path) -> list[Item]:
    """Every emoji image (base emoji and skin-tone variants) with the names its captions use; the target is the
    emoji named "banana"."""
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
                out.append(Item(code, entry["unified"], name + tone, tuple(a + tone for a in alts), entry["category"],
                                png, flippable=entry["category"] in FLIPPABLE and not re.search(r"left|right", name),
                                target=name == "banana"))
    return out


def caption(item: Item, rng: np.random.Generator) -> str:
    """A template caption of the emoji's name, or of one of its other names (30%)."""
    name = item.alt_names[int(rng.integers(len(item.alt_names)))] if item.alt_names and rng.random() < 0.3 \
        else item.name
    return TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(name)
