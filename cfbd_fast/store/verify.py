"""`store verify`: read back every committed byte of a store and check it against its commit record."""
from __future__ import annotations

from .record import COMMIT_RECORD
from .store import EmbeddingStore


def verify(store: EmbeddingStore, progress: bool = False) -> dict:
    """Check the commit record's checksum, every metadata and skip-list part (size, CRC, schema, row ids) and
    read every row of every matrix; raises StoreFormatError naming the first bad file. Returns what was checked,
    with the row health counts of `EmbeddingStore.health`."""
    body = store.record
    store.meta  # every metadata part: size, CRC, parquet, schema and row ids against the commit record
    store.skipped  # every skip-list part, the same way
    health = store.health(progress=progress)  # every row of every matrix is read
    parts = len(body["parts"]) + len(body.get("skipped", []))
    finished, done, total = store.completion
    return {"path": str(store.path), "ok": True, "rows": len(store), "files_checked": 1 + len(store.matrices) + parts,
            "parts_checked": parts, "record": COMMIT_RECORD, "complete": finished, "inputs_done": done,
            "inputs_total": total, "health": health}
