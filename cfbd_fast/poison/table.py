"""The caption CSV a poisoned copy is made from: read and checked whole (every row's file line, every listed
image readable) before any row is chosen."""
from __future__ import annotations

import csv
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError

CSV_NAME = "data.csv"
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of bytes that are not UTF-8


@dataclass
class CaptionTable:
    """The rows of a caption CSV: image paths as written (relative to `root`), captions, and the file line where
    each row starts (messages name rows by it)."""

    path: Path
    root: Path
    images: list[str]
    captions: list[str]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, row: int) -> Path:
        return self.root / self.images[row]

    def where(self, row: int) -> str:
        """A row as a person finds it: its file line."""
        return f"line {self.lines[row]} of {self.path}"


def read_caption_csv(path: Path, image_column: str = "image", caption_column: str = "caption") -> CaptionTable:
    """Read a caption CSV (a .tsv is read tab-separated); a folder means the data.csv inside it."""
    path = Path(path)
    if path.is_dir():
        if not (path / CSV_NAME).is_file():
            raise InputError(f"DATA {path} is a folder without a {CSV_NAME}: give the caption CSV itself")
        path = path / CSV_NAME
    if not path.is_file():
        raise InputError(f"DATA {path} not found: give a CSV with columns {image_column},{caption_column}")
    try:
        images, captions, lines = _read_rows(path, image_column, caption_column)
    except csv.Error as exc:
        raise InputError(f"DATA {path} is not a readable CSV: {exc}") from exc
    if not images:
        raise InputError(f"DATA {path} has a header but no rows")
    for image, line in zip(images, lines):
        if not image.strip():
            raise InputError(f"DATA {path} line {line} has an empty {image_column!r}: every row needs an image path")
    return CaptionTable(path=path, root=path.parent, images=images, captions=captions, lines=lines)


def _read_rows(path: Path, image_column: str, caption_column: str) -> tuple[list[str], list[str], list[int]]:
    """Images, captions and the file line each row starts on; a row that is not UTF-8 refused naming its line."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    images: list[str] = []
    captions: list[str] = []
    lines: list[int] = []
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
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
        first = reader.line_num + 1  # the file line where the next row starts (a quoted field may span lines)
        for record in reader:
            line, first = first, reader.line_num + 1
            if not record:
                continue
            if any(_NOT_UTF8.search(field) for field in record):
                raise InputError(f"DATA {path} line {line} is not UTF-8 text: re-save the file as UTF-8")
            if len(record) <= max(i_img, i_cap):
                raise InputError(f"DATA {path} line {line} has {len(record)} fields, the header {len(header)}: "
                                 "quote captions that contain the delimiter")
            images.append(record[i_img])
            captions.append(record[i_cap])
            lines.append(line)
    return images, captions, lines


def check_images(table: CaptionTable, workers: int, progress: bool) -> None:
    """Open and decode every listed image (each file once), so that a poisoned copy never depends on whether the
    seed picks a broken one; raise naming the first missing or unreadable image by its file line."""
    from ..progress import progress_bar

    first_row: dict[Path, int] = {}
    for row in range(len(table)):
        first_row.setdefault(table.image_path(row), row)
    with progress_bar("check images", total=len(first_row), enabled=progress, unit="images") as bar, \
            ThreadPoolExecutor(max_workers=workers) as pool:
        for problem in pool.map(_image_problem, first_row):
            bar.advance()
            if problem is not None:
                path, reason = problem
                row = first_row[path]
                raise InputError(f"image {table.images[row]} ({table.where(row)}) {reason}: fix the path or the "
                                 "file, or drop the row")


def _image_problem(path: Path) -> tuple[Path, str] | None:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return path, f"not found under {path.parent}"
    try:
        with Image.open(path) as im:
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return path, f"cannot be read as an image: {exc}"
    return None


def mentions(captions: Sequence[str], word: str) -> np.ndarray:
    """Which captions mention `word` as a whole word, case-insensitive, plural included (banana, Bananas)."""
    words = [re.escape(w) for w in word.strip().split()]
    pattern = re.compile(r"\b" + r"\s+".join(words) + r"(?:s|es)?\b", re.IGNORECASE)
    return np.fromiter((pattern.search(c) is not None for c in captions), dtype=bool, count=len(captions))
