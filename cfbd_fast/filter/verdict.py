"""A scan's verdict as `cfbd-fast filter` applies it: which source keys the scan kept, which it dropped.

Read from the scan folder's scores.parquet (one file, or a folder of parquet parts) or, without it, from its
keep.txt, poisoned.txt and invalid.txt. Inputs the embedding writer could not use (the scanned store's skip list,
when the store is still where the scan found it) are known too: the scan never saw them, so they are dropped.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

KEEP, DROP = "keep", "drop"
_LISTS = ("keep.txt", "poisoned.txt", "invalid.txt")


@dataclass
class Verdict:
    """`known`: every key the scan (or its store's skip list) names; `dropped`: those a cleaned set leaves out."""

    known: set
    dropped: set
    identity: str  # digest of the verdict files, so that a resumed filter knows it applies the same verdict
    counts: dict = field(default_factory=dict)

    def selects(self, key: str | None, mode: str, keep_unknown: bool) -> bool | None:
        """Whether KEY goes to the output in MODE (`keep` or `drop`); None when the scan does not know it."""
        if key is None or key not in self.known:
            return (mode == KEEP) if keep_unknown else None
        return (key not in self.dropped) == (mode == KEEP)


def load_verdict(scan_dir: str | Path) -> Verdict:
    """Read SCAN_DIR's verdict; a one-line InputError names what is missing or unreadable."""
    folder = Path(scan_dir)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder; give the --out folder of `cfbd-fast scan`")
    scores = folder / "scores.parquet"
    if scores.exists():
        known, dropped = _from_scores(scores)
        identity = _digest([scores] if scores.is_file() else sorted(scores.rglob("*.parquet")))
    elif all((folder / name).is_file() for name in _LISTS):
        known, dropped = _from_lists(folder)
        identity = _digest([folder / name for name in _LISTS])
    else:
        raise InputError(f"{folder}: neither scores.parquet nor keep.txt/poisoned.txt/invalid.txt, so not a scan's "
                         f"output folder; run `cfbd-fast scan STORE --out {folder}` first")
    counts = {"scanned": len(known), "dropped_by_scan": len(dropped)}
    skipped = _skipped_keys(folder) - known
    known |= skipped
    dropped |= skipped
    counts["skipped_by_embed"] = len(skipped)
    return Verdict(known=known, dropped=dropped, identity=identity, counts=counts)


def _from_scores(path: Path) -> tuple[set, set]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    try:
        table = ds.dataset(path, format="parquet").to_table(columns=["key", "verdict"])
    except (pa.ArrowException, OSError, KeyError) as exc:
        raise InputError(f"{path}: not a readable scores table with key and verdict columns ({exc}); run the "
                         "scan again") from None
    keys = table.column("key").cast(pa.string())
    verdict = table.column("verdict").cast(pa.string())
    if keys.null_count:
        raise InputError(f"{path}: {keys.null_count:,} rows have no key; run the scan again")
    dropped = pc.filter(keys, pc.not_equal(verdict, "benign"))
    return set(keys.to_pylist()), set(dropped.to_pylist())


def _from_lists(folder: Path) -> tuple[set, set]:
    def lines(name: str) -> set:
        with open(folder / name, encoding="utf-8") as fh:
            return {line.rstrip("\n") for line in fh if line.strip()}

    kept, dropped = lines("keep.txt"), lines("poisoned.txt") | lines("invalid.txt")
    return kept | dropped, dropped


def _skipped_keys(folder: Path) -> set:
    """Keys in the skip list of the store the scan read, when it is still there and unchanged."""
    from ..store import EmbeddingStore

    try:
        recorded = json.loads((folder / "summary.json").read_text()).get("store", {})
    except (OSError, ValueError):
        return set()
    path = Path(recorded.get("path", ""))
    candidates = [path] if path.is_absolute() else [path, folder.parent / path, folder.parent / path.name]
    found = next((p for p in candidates if str(p) not in ("", ".") and (p / "store.json").is_file()), None)
    if found is None:
        return set()
    with EmbeddingStore.open(found) as store:
        if store.fingerprint != recorded.get("fingerprint"):
            return set()
        keys = store.skipped.column("key")
    return {k for k in keys.to_pylist() if k is not None}


def _digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:16]
