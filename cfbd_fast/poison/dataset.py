"""Poisoned copies of a CleanCLIP-style caption CSV: read and check it, choose the rows, write the new folder.

Every random choice comes from a numpy Generator seeded by (seed, purpose, row or attack), so the same seed
gives the same bytes, whatever the number of worker threads.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import secrets
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ..errors import InputError
from . import attacks
from .templates import IMAGENET_TEMPLATES, one_caption

ATTACKS = ("badnets", "blended", "sig", "wanet", "nashville", "label-consistent", "badclip-style", "mmpoison",
           "multi-trigger", "one-caption")
# Attacks a multi-trigger run may mix, in the order it assigns them to targets when --attacks is not given.
MULTI_TRIGGER_ATTACKS = ("badnets", "blended", "sig", "wanet", "nashville", "badclip-style")
CLEAN_IMAGE_MODES = ("copy", "hardlink", "reference")
CSV_NAME = "data.csv"
RECORD_NAME = "poison_record.parquet"
POISONED_DIR = "poisoned"

# Purposes of the derived seeds, and stable codes of the attacks' shared (per-attack) randomness.
_SELECT, _CAPTION, _TRIGGER, _SHARED = 1, 2, 3, 4
_ATTACK_CODES = {"badnets": 1, "blended": 2, "sig": 3, "wanet": 4, "nashville": 5, "badclip-style": 6}
_CHUNK = 4096  # tasks handed to the thread pool at a time


@dataclass(frozen=True)
class TriggerOptions:
    """Trigger settings; None means the attack's default. Options an attack does not use must stay None."""

    position: str | None = None  # random | center | corners | X,Y (badnets, label-consistent, badclip-style)
    patch_size: int | None = None  # 16 (badnets, label-consistent, badclip-style)
    alpha: float | None = None  # 0.2 (blended; sig in blend mode)
    pattern: Path | None = None  # blended: an image instead of fresh uniform noise
    sig_mode: str | None = None  # blend (CleanCLIP) | add (BadCLIP)
    wanet_k: int | None = None  # 224: control grid size
    wanet_s: float | None = None  # 1.0: warping strength


_OPTION_USERS = {
    "position": ("badnets", "label-consistent", "badclip-style", "one-caption"),
    "patch_size": ("badnets", "label-consistent", "badclip-style", "one-caption"),
    "alpha": ("blended", "sig"),
    "pattern": ("blended",),
    "sig_mode": ("sig",),
    "wanet_k": ("wanet",),
    "wanet_s": ("wanet",),
}


@dataclass
class CaptionTable:
    """The rows of a caption CSV: image paths as written (relative to `root`) and captions."""

    path: Path
    root: Path
    images: list[str]
    captions: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, row: int) -> Path:
        return self.root / self.images[row]


@dataclass
class _Trigger:
    """One trigger, ready to apply: `apply(image, rng)` -> (image, params); `shared` are its per-attack params."""

    attack: str
    apply: Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, dict]]
    uses_rng: bool
    shared: dict = field(default_factory=dict)


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for one purpose (and row or attack), from the user's seed."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 32 | int(state[1])) & ((1 << 63) - 1))


def read_caption_csv(path: Path, image_column: str = "image", caption_column: str = "caption") -> CaptionTable:
    """Read a caption CSV (a .tsv is read tab-separated); a folder means the data.csv inside it."""
    path = Path(path)
    if path.is_dir():
        if not (path / CSV_NAME).is_file():
            raise InputError(f"DATA {path} is a folder without a {CSV_NAME}: give the caption CSV itself")
        path = path / CSV_NAME
    if not path.is_file():
        raise InputError(f"DATA {path} not found: give a CSV with columns {image_column},{caption_column}")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    images: list[str] = []
    captions: list[str] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                raise InputError(f"DATA {path} is empty: it needs a header row with {image_column},{caption_column}")
            header = [h.strip() for h in header]
            for name, option in ((image_column, "--image-column"), (caption_column, "--caption-column")):
                if name not in header:
                    raise InputError(f"DATA {path} has no column {name!r} (columns: {', '.join(header)}): "
                                     f"name the right one with {option}")
            i_img, i_cap = header.index(image_column), header.index(caption_column)
            for line, record in enumerate(reader, start=2):
                if not record:
                    continue
                if len(record) <= max(i_img, i_cap):
                    raise InputError(f"DATA {path} line {line} has {len(record)} fields, the header {len(header)}: "
                                     "quote captions that contain the delimiter")
                images.append(record[i_img])
                captions.append(record[i_cap])
    except UnicodeDecodeError as exc:
        raise InputError(f"DATA {path} is not UTF-8 text ({exc.reason} at byte {exc.start}): re-save it as UTF-8"
                         ) from exc
    except csv.Error as exc:
        raise InputError(f"DATA {path} is not a readable CSV: {exc}") from exc
    if not images:
        raise InputError(f"DATA {path} has a header but no rows")
    for row, image in enumerate(images):
        if not image.strip():
            raise InputError(f"DATA {path} row {row} has an empty {image_column!r}: every row needs an image path")
    return CaptionTable(path=path, root=path.parent, images=images, captions=captions)


def check_images_exist(table: CaptionTable) -> None:
    """Raise naming the first row whose image file is missing."""
    seen: set[str] = set()
    for row, image in enumerate(table.images):
        if image in seen:
            continue
        seen.add(image)
        if not table.image_path(row).is_file():
            raise InputError(f"image {image} (row {row} of {table.path}) not found under {table.root}: "
                             "fix the path or drop the row")


def mentions(captions: Sequence[str], word: str) -> np.ndarray:
    """Which captions mention `word` as a whole word, case-insensitive, plural included (banana, Bananas)."""
    words = [re.escape(w) for w in word.strip().split()]
    pattern = re.compile(r"\b" + r"\s+".join(words) + r"(?:s|es)?\b", re.IGNORECASE)
    return np.fromiter((pattern.search(c) is not None for c in captions), dtype=bool, count=len(captions))


def template_captions(target: str, rows: Iterable[int], seed: int) -> list[str]:
    """One of the 80 ImageNet templates per row, drawn with the row's caption Generator."""
    return [IMAGENET_TEMPLATES[int(np.random.default_rng(derive_seed(seed, _CAPTION, r)).integers(
        len(IMAGENET_TEMPLATES)))].format(target) for r in rows]


def natural_caption(pool: Sequence[str], own: str, row: int, seed: int) -> str:
    """One caption of `pool` (real captions that mention the target) other than the row's own, drawn with the
    row's caption Generator."""
    choices = [c for c in pool if c != own] or pool
    return choices[int(np.random.default_rng(derive_seed(seed, _CAPTION, row)).integers(len(choices)))]


def build_trigger(attack: str, options: TriggerOptions, seed: int) -> _Trigger:
    """The trigger of `attack` with its per-attack randomness (WaNet grid, BadCLIP-style patch) drawn from seed."""
    if attack in ("badnets", "label-consistent", "one-caption"):  # one-caption: badnets' patch, one caption
        position = attacks.parse_position(options.position or "random")
        size = options.patch_size or attacks.PATCH_SIZE
        return _Trigger("badnets", lambda img, rng: attacks.badnets(img, rng, position, size), uses_rng=True)
    if attack == "blended":
        alpha = 0.2 if options.alpha is None else options.alpha
        if options.pattern is None:
            return _Trigger("blended", lambda img, rng: attacks.blended(img, rng, alpha=alpha), uses_rng=True)
        pattern, digest = _load_pattern(Path(options.pattern))
        shared = {"pattern_file": Path(options.pattern).name, "pattern_sha256": digest}
        return _Trigger("blended", lambda img, rng: attacks.blended(img, pattern=pattern, alpha=alpha),
                        uses_rng=False, shared=shared)
    if attack == "sig":
        alpha = 0.2 if options.alpha is None else options.alpha
        mode = options.sig_mode or "blend"
        return _Trigger("sig", lambda img, rng: attacks.sig(img, mode=mode, alpha=alpha), uses_rng=False)
    if attack == "wanet":
        k = options.wanet_k or attacks.IMAGE_SIZE
        s = 1.0 if options.wanet_s is None else options.wanet_s
        grid_seed = derive_seed(seed, _SHARED, _ATTACK_CODES["wanet"])
        grid = attacks.wanet_grid(np.random.default_rng(grid_seed), attacks.IMAGE_SIZE, k, s)
        shared = {"grid_seed": grid_seed, "k": k, "s": s, "size": attacks.IMAGE_SIZE}
        return _Trigger("wanet", lambda img, rng: attacks.wanet(img, grid), uses_rng=False, shared=shared)
    if attack == "nashville":
        return _Trigger("nashville", lambda img, rng: attacks.nashville(img), uses_rng=False)
    if attack == "badclip-style":
        size = options.patch_size or attacks.PATCH_SIZE
        position = attacks.parse_position(options.position or "center")
        patch_seed = derive_seed(seed, _SHARED, _ATTACK_CODES["badclip-style"])
        patch = attacks.random_patch(np.random.default_rng(patch_seed), size)
        return _Trigger("badclip-style", lambda img, rng: attacks.fixed_patch(img, patch, position),
                        uses_rng=False, shared={"patch_seed": patch_seed, "patch": "uniform RGB"})
    raise InputError(f"attack {attack!r} has no image trigger")


def poison_dataset(
    data: str | Path,
    out: str | Path,
    attack: str,
    *,
    target: str = "banana",
    targets: Sequence[str] | None = None,
    multi_attacks: Sequence[str] | None = None,
    rate: float | None = None,
    n: int | None = None,
    seed: int = 0,
    image_only: bool = False,
    image_column: str = "image",
    caption_column: str = "caption",
    options: TriggerOptions = TriggerOptions(),
    source_class: str | None = None,
    clean_images: str = "copy",
    force: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Write OUT/data.csv (image, caption, is_poisoned), OUT/poisoned/<row>.png and OUT/poison_record.parquet.

    Returns a summary dict (rows, poisoned, attack, seed, out, targets, triggers, warnings, seconds).
    """
    started = time.perf_counter()
    out = Path(out)
    plan_targets, plan_attacks = _check_arguments(attack, target, targets, multi_attacks, rate, n, seed, image_only,
                                                  options, source_class, clean_images, workers)
    _check_out(out, Path(data), force)
    table = read_caption_csv(Path(data), image_column, caption_column)
    check_images_exist(table)
    poison_rows, new_captions, row_attacks, row_targets, notes = _plan(
        table, attack, plan_targets, plan_attacks, rate, n, seed, image_only, source_class)
    triggers = {a: build_trigger(a, options, seed) for a in sorted(set(row_attacks)) if a != "mmpoison"}
    for message in notes:
        warnings.warn(message, stacklevel=2)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_dir(out.parent, f".{out.name}.", ".partial")
    try:
        record = _write(table, tmp, out, attack, poison_rows, new_captions, row_attacks, row_targets, triggers,
                        seed, clean_images, workers, progress)
        _write_record(tmp / RECORD_NAME, record, {
            "attack": attack, "targets": plan_targets, "attacks": plan_attacks, "seed": seed,
            "image_only": image_only, "rows": len(table), "data": table.path.name, "source_class": source_class,
            "clean_images": clean_images})
        _move_into_place(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    counts: dict[str, int] = {}
    for a in row_attacks:
        name = "none" if a == "mmpoison" else triggers[a].attack
        counts[name] = counts.get(name, 0) + 1
    return {
        "rows": len(table), "poisoned": len(poison_rows), "attack": attack, "seed": seed, "out": str(out),
        "targets": plan_targets, "attacks": dict(zip(plan_targets, plan_attacks)), "image_only": image_only,
        "triggers": counts, "warnings": notes, "seconds": round(time.perf_counter() - started, 3),
    }


def _check_arguments(attack, target, targets, multi_attacks, rate, n, seed, image_only, options, source_class,
                     clean_images, workers) -> tuple[list[str], list[str]]:
    if attack not in ATTACKS:
        raise InputError(f"unknown attack {attack!r} for --attack: choose one of {', '.join(ATTACKS)}")
    if rate is not None and n is not None:
        raise InputError("give --rate or --n, not both")
    if rate is None and n is None and not image_only:
        raise InputError("say how many rows to poison: --rate FRACTION (e.g. 0.01) or --n COUNT")
    if rate is not None and not 0.0 < rate <= 1.0:
        raise InputError(f"--rate {rate} must lie in (0, 1]: it is the fraction of DATA's rows to poison")
    if n is not None and n < 1:
        raise InputError(f"--n {n} must be at least 1")
    if seed < 0:
        raise InputError(f"--seed {seed} must be a non-negative integer")
    if clean_images not in CLEAN_IMAGE_MODES:
        raise InputError(f"--clean-images {clean_images!r}: choose one of {', '.join(CLEAN_IMAGE_MODES)}")
    if workers is not None and workers < 1:
        raise InputError(f"--workers {workers} must be at least 1")
    if attack == "multi-trigger":
        if image_only:
            raise InputError("--image-only renders one trigger at a time: run it once per attack with the same "
                             "--seed (multi-trigger uses the single attacks' triggers for that seed)")
        names = [t.strip() for t in (targets or [])]
        if len(names) < 2:
            raise InputError("--attack multi-trigger needs --targets with two or more targets, e.g. banana,airplane")
        if multi_attacks:
            chosen = [a.strip() for a in multi_attacks]
            for a in chosen:
                if a not in MULTI_TRIGGER_ATTACKS:
                    raise InputError(f"--attacks: {a!r} cannot be mixed; choose from "
                                     f"{', '.join(MULTI_TRIGGER_ATTACKS)}")
            if len(chosen) != len(names):
                raise InputError(f"--attacks names {len(chosen)} attacks for {len(names)} targets: give one per target")
            if len(set(chosen)) != len(chosen):
                raise InputError("--attacks repeats an attack: give each target a different trigger")
        else:
            if len(names) > len(MULTI_TRIGGER_ATTACKS):
                raise InputError(f"--targets names {len(names)} targets, more than the {len(MULTI_TRIGGER_ATTACKS)} "
                                 "distinct triggers: use fewer targets")
            chosen = list(MULTI_TRIGGER_ATTACKS[:len(names)])
    else:
        if targets:
            raise InputError("--targets is for --attack multi-trigger; give a single --target")
        if multi_attacks:
            raise InputError("--attacks is for --attack multi-trigger; give a single --attack")
        names, chosen = [target.strip()], [attack]
    for name in names:
        if not name or "\n" in name:
            raise InputError(f"target {name!r} must be a non-empty word or phrase, e.g. banana")
    if len(set(n_.lower() for n_ in names)) != len(names):
        raise InputError("--targets repeats a target: give each once")
    if attack == "mmpoison":
        if image_only:
            raise InputError("mmpoison has no image trigger: --image-only does not apply to it")
        if not source_class or not source_class.strip():
            raise InputError("--attack mmpoison needs --source-class WORD: the class whose images get target captions")
        if source_class.strip().lower() == names[0].lower():
            raise InputError(f"--source-class {source_class!r} is the target itself: choose another class")
    elif source_class is not None:
        raise InputError("--source-class applies to --attack mmpoison only")
    for option, users in _OPTION_USERS.items():
        if getattr(options, option) is not None and not set(users) & set(chosen):
            flag = "--" + option.replace("_", "-")
            raise InputError(f"{flag} applies to {', '.join(users)}, not to {', '.join(chosen)}")
    _check_trigger_options(options)
    return names, chosen


def _check_trigger_options(options: TriggerOptions) -> None:
    size = attacks.IMAGE_SIZE
    if options.patch_size is not None and not 1 <= options.patch_size <= size:
        raise InputError(f"--patch-size {options.patch_size} must lie in [1, {size}]")
    if options.position is not None:
        try:
            position = attacks.parse_position(options.position)
            if position != "random":
                attacks.patch_positions(position, options.patch_size or attacks.PATCH_SIZE, size, size)
        except ValueError as exc:
            raise InputError(f"--position: {exc}") from exc
    if options.alpha is not None and not 0.0 < options.alpha <= 1.0:
        raise InputError(f"--alpha {options.alpha} must lie in (0, 1]")
    if options.sig_mode is not None and options.sig_mode not in ("blend", "add"):
        raise InputError(f"--sig-mode {options.sig_mode!r}: choose blend or add")
    if options.wanet_k is not None and not 1 <= options.wanet_k <= size:
        raise InputError(f"--wanet-k {options.wanet_k} must lie in [1, {size}]")
    if options.wanet_s is not None and not options.wanet_s > 0:
        raise InputError(f"--wanet-s {options.wanet_s} must be positive")
    if options.pattern is not None and not Path(options.pattern).is_file():
        raise InputError(f"--pattern {options.pattern} not found: give an image file to blend in")


def _check_out(out: Path, data: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not force:
            raise InputError(f"--out {out} already exists: pass --force to replace it, or choose another --out")
        data_abs = Path(os.path.abspath(data))
        out_abs = Path(os.path.abspath(out))
        if out_abs == data_abs or out_abs in data_abs.parents:
            raise InputError(f"--out {out} holds DATA {data}: --force would delete the input; choose another --out")


def _count(rate: float | None, n: int | None, available: int, rows: int, what: str, table: CaptionTable) -> int:
    if n is None and rate is None:
        return available
    k = n if n is not None else int(round(rate * rows))
    if rate is not None and k == 0:
        raise InputError(f"--rate {rate} of {rows} rows in {table.path} poisons no row: raise --rate or use --n")
    if k > available:
        given = f"--n {n}" if n is not None else f"--rate {rate} ({k} rows)"
        raise InputError(f"{given} asks for more rows than the {available} {what} of {table.path}: lower it")
    return k


def _plan(table: CaptionTable, attack: str, targets: list[str], chosen: list[str], rate, n, seed: int,
          image_only: bool, source_class: str | None):
    """Rows to poison (sorted), their new captions, trigger attacks and targets, and warnings to show."""
    rows = len(table)
    notes: list[str] = []
    select = np.random.default_rng(derive_seed(seed, _SELECT))
    if attack == "label-consistent" and not image_only:
        candidates = np.flatnonzero(mentions(table.captions, targets[0]))
        if candidates.size == 0:
            raise InputError(f"no caption in {table.path} mentions {targets[0]!r}: label-consistent poisons only rows "
                             "whose caption already names the target; choose another --target")
        what = f"rows whose caption mentions {targets[0]!r}"
    elif attack == "mmpoison":
        source = mentions(table.captions, source_class)
        candidates = np.flatnonzero(source & ~mentions(table.captions, targets[0]))
        if candidates.size == 0:
            raise InputError(f"no caption in {table.path} mentions {source_class!r} (--source-class) without "
                             f"{targets[0]!r}: choose a class the captions name")
        what = f"rows whose caption mentions {source_class!r}"
    else:
        candidates = np.arange(rows)
        what = "rows"
    k = _count(rate, n, int(candidates.size), rows, what, table)
    if k < len(targets):
        raise InputError(f"{k} poisoned rows cannot cover {len(targets)} targets: raise --n or --rate to at least "
                         f"one row per target")
    picked = select.choice(candidates, size=k, replace=False) if k < candidates.size else select.permutation(candidates)
    # Split among the targets (multi-trigger): sizes as even as possible, the first targets take the remainder.
    sizes = [k // len(targets) + (1 if i < k % len(targets) else 0) for i in range(len(targets))]
    poison_rows: list[int] = []
    row_attacks: list[str] = []
    row_targets: list[str] = []
    start = 0
    for tgt, att, size in zip(targets, chosen, sizes):
        group = sorted(int(r) for r in picked[start:start + size])
        start += size
        poison_rows += group
        row_attacks += [att] * len(group)
        row_targets += [tgt] * len(group)
    order = np.argsort(poison_rows, kind="stable")
    poison_rows = [poison_rows[i] for i in order]
    row_attacks = [row_attacks[i] for i in order]
    row_targets = [row_targets[i] for i in order]

    new_captions: list[str] = []
    pools: dict[str, list[str]] = {}
    for row, att, tgt in zip(poison_rows, row_attacks, row_targets):
        if image_only or att == "label-consistent":
            new_captions.append(table.captions[row])
        elif att in ("badclip-style", "mmpoison"):
            if tgt not in pools:
                pools[tgt] = [table.captions[i] for i in np.flatnonzero(mentions(table.captions, tgt))]
                if not pools[tgt]:
                    notes.append(f"no caption in {table.path} mentions {tgt!r}: {att} falls back to the ImageNet "
                                 "templates for its target captions")
            pool = pools[tgt]
            if pool:
                new_captions.append(natural_caption(pool, table.captions[row], row, seed))
            else:
                new_captions += template_captions(tgt, [row], seed)
        elif att == "one-caption":
            new_captions.append(one_caption(tgt))
        else:
            new_captions += template_captions(tgt, [row], seed)
    return poison_rows, new_captions, row_attacks, row_targets, notes


def _load_pattern(path: Path) -> tuple[np.ndarray, str]:
    from PIL import Image, UnidentifiedImageError

    try:
        data = path.read_bytes()
        with Image.open(path) as im:
            pattern = attacks.resize_image(im)
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"--pattern {path} cannot be read as an image: {exc}") from exc
    return pattern, hashlib.sha256(data).hexdigest()


def _clean_destination(image: str, key: int) -> str:
    """Where a clean image goes inside OUT: images/<its relative path>, or outside/<key>-<name> for a path
    that is absolute or leaves DATA's folder."""
    normalised = os.path.normpath(image).replace(os.sep, "/")
    if os.path.isabs(image) or normalised == ".." or normalised.startswith("../"):
        return f"outside/{key}-{os.path.basename(normalised)}"
    return f"images/{normalised}"


def _write(table: CaptionTable, tmp: Path, out: Path, attack: str, poison_rows: list[int], new_captions: list[str],
           row_attacks: list[str], row_targets: list[str], triggers: dict[str, _Trigger], seed: int,
           clean_images: str, workers: int | None, progress: bool) -> dict:
    from PIL import Image, UnidentifiedImageError

    from ..progress import progress_bar
    from ..threads import available_cores

    rows = len(table)
    poisoned = dict(zip(poison_rows, range(len(poison_rows))))
    rendered = {r for r, a in zip(poison_rows, row_attacks) if a != "mmpoison"}
    out_abs = Path(os.path.abspath(out))

    # Clean (and untriggered mmpoison) rows: one destination per distinct source file.
    destination: dict[str, str] = {}
    copies: list[tuple[Path, Path]] = []
    planned: set[str] = set()
    for row in range(rows):
        image = table.images[row]
        if row in rendered or image in destination:
            continue
        if clean_images == "reference":
            destination[image] = Path(os.path.relpath(os.path.abspath(table.image_path(row)), out_abs)).as_posix()
            continue
        destination[image] = dest = _clean_destination(image, row)
        if dest not in planned:  # 'a/b.png' and './a/b.png' are one file
            planned.add(dest)
            copies.append((table.image_path(row), tmp / dest))

    def copy(task: tuple[Path, Path]) -> None:
        src, dst = task
        dst.parent.mkdir(parents=True, exist_ok=True)
        if clean_images == "hardlink":
            try:
                os.link(src, dst)
                return
            except OSError:  # another file system, or links not allowed: copy instead
                pass
        shutil.copyfile(src, dst)

    (tmp / POISONED_DIR).mkdir()

    def render(row: int) -> tuple[dict, list[list[int]]]:
        i = poisoned[row]
        trigger = triggers[row_attacks[i]]
        src = table.image_path(row)
        try:
            with Image.open(src) as im:
                image = attacks.resize_image(im)
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"image {table.images[row]} (row {row} of {table.path}) cannot be read as an image: "
                             f"{exc}") from exc
        rng = np.random.default_rng(derive_seed(seed, _TRIGGER, row))
        triggered, params = trigger.apply(image, rng)
        Image.fromarray(attacks.to_uint8(triggered)).save(tmp / POISONED_DIR / f"{row}.png", format="PNG")
        positions = params.pop("positions")
        return {**trigger.shared, **params}, positions

    n_workers = workers or available_cores()
    render_rows = sorted(rendered)
    results: dict[int, tuple[dict, list]] = {}
    with progress_bar("poison", total=len(copies) + len(render_rows), enabled=progress, unit="images") as bar, \
            ThreadPoolExecutor(max_workers=n_workers) as pool:
        for start in range(0, len(render_rows), _CHUNK):
            chunk = render_rows[start:start + _CHUNK]
            for row, result in zip(chunk, pool.map(render, chunk)):
                results[row] = result
                bar.advance()
        for start in range(0, len(copies), _CHUNK):
            chunk = copies[start:start + _CHUNK]
            for _ in pool.map(copy, chunk):
                bar.advance()

    with open(tmp / CSV_NAME, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image", "caption", "is_poisoned"])
        for row in range(rows):
            if row in poisoned:
                i = poisoned[row]
                image = f"{POISONED_DIR}/{row}.png" if row in rendered else destination[table.images[row]]
                writer.writerow([image, new_captions[i], 1])
            else:
                writer.writerow([destination[table.images[row]], table.captions[row], 0])

    record: dict[str, list] = {name: [] for name in (
        "row", "attack", "trigger", "target", "position", "trigger_params", "trigger_seed", "original_image",
        "new_image", "original_caption", "new_caption", "seed")}
    for i, row in enumerate(poison_rows):
        att = row_attacks[i]
        if row in rendered:
            params, positions = results[row]
            trigger_name = triggers[att].attack
            trigger_seed = derive_seed(seed, _TRIGGER, row) if triggers[att].uses_rng else None
            new_image = f"{POISONED_DIR}/{row}.png"
        else:
            params, positions, trigger_name, trigger_seed = {"repaired_from": "source class"}, [], "none", None
            new_image = destination[table.images[row]]
        record["row"].append(row)
        record["attack"].append(attack)
        record["trigger"].append(trigger_name)
        record["target"].append(row_targets[i])
        record["position"].append(positions)
        record["trigger_params"].append(json.dumps(params, sort_keys=True))
        record["trigger_seed"].append(trigger_seed)
        record["original_image"].append(table.images[row])
        record["new_image"].append(new_image)
        record["original_caption"].append(table.captions[row])
        record["new_caption"].append(new_captions[i])
        record["seed"].append(seed)
    return record


def _write_record(path: Path, record: dict, meta: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .._version import __version__

    schema = pa.schema([
        ("row", pa.int64()), ("attack", pa.string()), ("trigger", pa.string()), ("target", pa.string()),
        ("position", pa.list_(pa.list_(pa.int32()))), ("trigger_params", pa.string()), ("trigger_seed", pa.int64()),
        ("original_image", pa.string()), ("new_image", pa.string()), ("original_caption", pa.string()),
        ("new_caption", pa.string()), ("seed", pa.int64()),
    ], metadata={"cfbd_fast.poison": json.dumps({**meta, "version": __version__}, sort_keys=True)})
    table = pa.table(record, schema=schema)
    pq.write_table(table, path)


def _fresh_dir(parent: Path, prefix: str, suffix: str) -> Path:
    """A new empty folder with a random name (made with the user's umask, unlike tempfile.mkdtemp's 0700)."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {parent / prefix}")


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not force:  # appeared while we wrote
            raise InputError(f"--out {out} already exists: pass --force to replace it, or choose another --out")
        old = _fresh_dir(out.parent, f".{out.name}.", ".old")
        os.rename(out, old / "previous")
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.rename(tmp, out)
