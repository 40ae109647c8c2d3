"""The filter's output folder: each output shard is written under a temporary name, fsynced and renamed into place,
then recorded in OUT/filter.json; a rerun with the same inputs skips the shards recorded there.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import InputError

MANIFEST = "filter.json"
_TMP_PREFIX = ".cfbd-filter-tmp-"


class FilterOutput:
    """OUT, opened for a filter run with IDENTITY (what a resumed run must match: scan, data, format, mode)."""

    def __init__(self, out: str | os.PathLike, identity: dict):
        self.path = Path(out)
        self.identity = identity
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"--out {self.path} is a file: give a folder for the filtered copy")
        manifest = self.path / MANIFEST
        self.record = {"identity": identity, "complete": False, "shards": {}}
        if manifest.is_file():
            try:
                earlier = json.loads(manifest.read_text())
            except ValueError:
                earlier = {}
            if earlier.get("identity") != identity:
                raise InputError(f"--out {self.path} holds a filter of other inputs or options ({MANIFEST}); remove "
                                 "it or choose another folder")
            self.record = earlier
            self.record["complete"] = False
        elif self.path.is_dir() and any(self.path.iterdir()):
            raise InputError(f"--out {self.path} is not empty and holds no {MANIFEST}; choose a new folder")
        if not self.path.parent.is_dir():
            raise InputError(f"--out {self.path}: its parent folder {self.path.parent} does not exist")
        self.path.mkdir(exist_ok=True)
        for stale in self.path.glob(_TMP_PREFIX + "*"):  # what a killed run left half-written
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()

    @property
    def resumed(self) -> int:
        return len(self.record["shards"])

    def done(self, name: str) -> dict | None:
        """The counts of shard NAME when an earlier run published it."""
        return self.record["shards"].get(name)

    def tmp(self, name: str) -> Path:
        return self.path / f"{_TMP_PREFIX}{name}"

    def publish(self, name: str, counts: dict, moves: list[tuple[Path, str]]) -> None:
        """Move each (temporary path, final name) into place, folders before files, then record NAME's counts."""
        for tmp, final in moves:
            _fsync_tree(tmp)
            target = self.path / final
            if target.is_dir() and tmp.is_dir():  # left by a run killed before it recorded this shard
                shutil.rmtree(target)
            os.replace(tmp, target)
        _fsync_dir(self.path)
        self.record["shards"][name] = counts
        self._write()

    def finish(self, totals: dict) -> dict:
        self.record["complete"] = True
        self.record["totals"] = totals
        self._write()
        return self.record

    def _write(self) -> None:
        tmp = self.path / (_TMP_PREFIX + MANIFEST)
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.record, fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path / MANIFEST)
        _fsync_dir(self.path)


def _fsync_tree(path: Path) -> None:
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in paths:
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
    if path.is_dir():
        _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_or_copy(src: str | os.PathLike, dst: Path) -> None:
    """DST becomes the same bytes as SRC: a hard link where the filesystem allows one, a copy otherwise."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
