"""Writing a poisoned copy: the triggered images, the clean images (copied, hard-linked or referenced), data.csv
and the record of every poisoned row, into a temporary folder moved into place whole."""
from __future__ import annotations

import csv
import json
import os
import secrets
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from . import attacks
from .plan import TRIGGER, derive_seed
from .table import CSV_NAME, CaptionTable
from .triggers import Trigger

RECORD_NAME = "poison_record.parquet"
POISONED_DIR = "poisoned"
_CHUNK = 4096  # tasks handed to the thread pool at a time
RECORD_COLUMNS = ("row", "attack", "trigger", "target", "position", "trigger_params", "trigger_seed",
                  "original_image", "new_image", "original_caption", "new_caption", "seed")


@dataclass
class Poisoning:
    """The planned change of a copy: rows to poison (sorted), and per poisoned row its new caption, attack and
    target; the triggers by attack."""

    attack: str
    rows: list[int]
    captions: list[str]
    attacks: list[str]
    targets: list[str]
    triggers: dict[str, Trigger]
    seed: int
    index: dict[int, int] = field(init=False)  # row -> its position in the lists above
    rendered: set[int] = field(init=False)  # rows whose image gets a trigger (mmpoison's keep their image)

    def __post_init__(self):
        self.index = dict(zip(self.rows, range(len(self.rows))))
        self.rendered = {r for r, a in zip(self.rows, self.attacks) if a != "mmpoison"}


def write_copy(table: CaptionTable, tmp: Path, out: Path, plan: Poisoning, clean_images: str, workers: int,
               progress: bool) -> dict:
    """Write the copy's images and data.csv into `tmp` (to become `out`); the record's columns."""
    from ..progress import progress_bar

    destination, copies = _clean_destinations(table, tmp, out, plan.rendered, clean_images)
    (tmp / POISONED_DIR).mkdir()
    render_rows = sorted(plan.rendered)
    results: dict[int, tuple[dict, list]] = {}
    with progress_bar("poison", total=len(copies) + len(render_rows), enabled=progress, unit="images") as bar, \
            ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(render_rows), _CHUNK):
            chunk = render_rows[start:start + _CHUNK]
            for row, result in zip(chunk, pool.map(lambda r: _render(table, r, plan, tmp), chunk)):
                results[row] = result
                bar.advance()
        for start in range(0, len(copies), _CHUNK):
            for _ in pool.map(lambda task: _copy(*task, clean_images), copies[start:start + _CHUNK]):
                bar.advance()
    _write_csv(tmp / CSV_NAME, table, plan, destination)
    return _record(table, plan, destination, results)


def _clean_destinations(table: CaptionTable, tmp: Path, out: Path, rendered: set[int],
                        clean_images: str) -> tuple[dict[str, str], list[tuple[Path, Path]]]:
    """Where each clean (and untriggered mmpoison) image goes in the copy, one destination per distinct source
    file, and the files to copy or link there."""
    out_abs = Path(os.path.abspath(out))
    destination: dict[str, str] = {}
    copies: list[tuple[Path, Path]] = []
    planned: set[str] = set()
    for row in range(len(table)):
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
    return destination, copies


def _copy(src: Path, dst: Path, clean_images: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if clean_images == "hardlink":
        try:
            os.link(src, dst)
            return
        except OSError:  # another file system, or links not allowed: copy instead
            pass
    shutil.copyfile(src, dst)


def _render(table: CaptionTable, row: int, plan: Poisoning, tmp: Path) -> tuple[dict, list[list[int]]]:
    """Write poisoned/<row>.png, the row's image with its trigger; the trigger's parameters and positions."""
    from PIL import Image, UnidentifiedImageError

    trigger = plan.triggers[plan.attacks[plan.index[row]]]
    try:
        with Image.open(table.image_path(row)) as im:
            image = attacks.resize_image(im)
    except (UnidentifiedImageError, OSError) as exc:  # changed since the images were checked
        raise InputError(f"image {table.images[row]} ({table.where(row)}) cannot be read as an image: {exc}") from exc
    rng = np.random.default_rng(derive_seed(plan.seed, TRIGGER, row))
    triggered, params = trigger.apply(image, rng)
    Image.fromarray(attacks.to_uint8(triggered)).save(tmp / POISONED_DIR / f"{row}.png", format="PNG")
    positions = params.pop("positions")
    return {**trigger.shared, **params}, positions


def _write_csv(path: Path, table: CaptionTable, plan: Poisoning, destination: dict[str, str]) -> None:
    index, rendered = plan.index, plan.rendered
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image", "caption", "is_poisoned"])
        for row in range(len(table)):
            if row in index:
                image = f"{POISONED_DIR}/{row}.png" if row in rendered else destination[table.images[row]]
                writer.writerow([image, plan.captions[index[row]], 1])
            else:
                writer.writerow([destination[table.images[row]], table.captions[row], 0])


def _record(table: CaptionTable, plan: Poisoning, destination: dict[str, str], results: dict) -> dict:
    """The record's columns: one entry per poisoned row."""
    record: dict[str, list] = {name: [] for name in RECORD_COLUMNS}
    rendered = plan.rendered
    for i, row in enumerate(plan.rows):
        trigger = plan.triggers.get(plan.attacks[i])
        if row in rendered:
            params, positions = results[row]
            trigger_name = trigger.attack
            trigger_seed = derive_seed(plan.seed, TRIGGER, row) if trigger.uses_rng else None
            new_image = f"{POISONED_DIR}/{row}.png"
        else:
            params, positions, trigger_name, trigger_seed = {"repaired_from": "source class"}, [], "none", None
            new_image = destination[table.images[row]]
        values = (row, plan.attack, trigger_name, plan.targets[i], positions, json.dumps(params, sort_keys=True),
                  trigger_seed, table.images[row], new_image, table.captions[row], plan.captions[i], plan.seed)
        for name, value in zip(RECORD_COLUMNS, values):
            record[name].append(value)
    return record


def _clean_destination(image: str, key: int) -> str:
    """Where a clean image goes inside OUT: images/<its relative path>, or outside/<key>-<name> for a path
    that is absolute or leaves DATA's folder."""
    normalised = os.path.normpath(image).replace(os.sep, "/")
    if os.path.isabs(image) or normalised == ".." or normalised.startswith("../"):
        return f"outside/{key}-{os.path.basename(normalised)}"
    return f"images/{normalised}"


def write_record(path: Path, record: dict, meta: dict) -> None:
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


def fresh_dir(parent: Path, prefix: str, suffix: str) -> Path:
    """A new empty folder with a random name (made with the user's umask, unlike tempfile.mkdtemp's 0700)."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {parent / prefix}")


def move_into_place(tmp: Path, out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not force:  # appeared while we wrote
            raise InputError(f"--out {out} already exists: pass --force to replace it, or choose another --out")
        old = fresh_dir(out.parent, f".{out.name}.", ".old")
        os.rename(out, old / "previous")
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.rename(tmp, out)


def check_out(out: Path, data: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not force:
            raise InputError(f"--out {out} already exists: pass --force to replace it, or choose another --out")
        data_abs = Path(os.path.abspath(data))
        out_abs = Path(os.path.abspath(out))
        if out_abs == data_abs or out_abs in data_abs.parents:
            raise InputError(f"--out {out} holds DATA {data}: --force would delete the input; choose another --out")
