"""`embed`'s commits: a chunk of finished rows and skips, written to the store by one background thread."""
from __future__ import annotations

import time
from collections import Counter

import numpy as np

from ..store import EmbeddingStore
from .output import RECORD_KEY


class _CommitWriter:
    """Commits chunks to the store on one background thread, one at a time and in order.

    `submit` waits for the previous commit (so at most one chunk waits in memory) and re-raises its error;
    leaving the context waits for the last one, also when the loop failed, so the store is never closed mid-commit.
    """

    def __init__(self, store: EmbeddingStore, timings: Counter):
        from concurrent.futures import ThreadPoolExecutor

        self._store, self._timings = store, timings
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cfbd-commit")
        self._future = None

    def submit(self, chunk: "_Chunk", record: dict) -> None:
        self._wait()
        self._future = self._pool.submit(self._commit, chunk, record)

    def _commit(self, chunk: "_Chunk", record: dict) -> None:
        tick = time.perf_counter()
        chunk.commit(self._store, record)
        self._timings["write_s"] += time.perf_counter() - tick

    def _wait(self) -> None:
        if self._future is not None:
            future, self._future = self._future, None
            future.result()

    def __enter__(self) -> "_CommitWriter":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._wait()
        finally:
            self._pool.shutdown(wait=True)


class _Chunk:
    """Rows and skip-list entries of one commit chunk, appended to the store in one commit."""

    def __init__(self, has_poison_labels: bool):
        self.images, self.texts, self.kept, self.skips = [], [], [], []
        self.has_poison_labels = has_poison_labels

    def add(self, image: np.ndarray, text: np.ndarray, kept: list) -> None:
        self.images.append(image)
        self.texts.append(text)
        self.kept.extend(kept)

    def commit(self, store: EmbeddingStore, record: dict) -> None:
        dim = store.dim
        image = np.concatenate(self.images) if self.images else np.empty((0, dim), np.float32)
        text = np.concatenate(self.texts) if self.texts else np.empty((0, dim), np.float32)
        meta = {"key": [k for k, _, _, _ in self.kept], "caption": [c for _, _, c, _ in self.kept],
                "source": [s for _, s, _, _ in self.kept]}
        poisoned = [p for _, _, _, p in self.kept]
        if self.has_poison_labels or any(p is not None for p in poisoned):
            meta["is_poisoned"] = poisoned
        skipped = None
        if self.skips:
            skipped = {name: [entry[i] for entry in self.skips]
                       for i, name in enumerate(("key", "source", "reason", "detail"))}
        store.append(image=image, text=text, meta=meta, skipped=skipped, record={RECORD_KEY: record})
