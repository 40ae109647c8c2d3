"""Synthetic CLIP-like image-caption embeddings with planted backdoor pairs: a demo and a load generator.

The data imitates the geometry of CLIP embeddings, not their content (demo_world.py describes its model), so
results on it show that the pipeline runs and how fast, not how accurate it is on real data. Any row range of a
split can be generated alone, in bounded memory, identical whatever the chunking; the reference split
(`generate_reference`) comes from the same domain as the scanned split and can train a mapping network.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .demo_world import (BLOCK_ROWS, KINDS, TARGET_NAME, TARGET_TEMPLATES, DemoPairs, generate_block, make_plan,
                         make_world)
from .errors import InputError
from .progress import progress_bar

__all__ = ["BLOCK_ROWS", "DEMO_MAPPER_OPTIONS", "DEMO_MODEL", "KINDS", "TARGET_NAME", "TARGET_TEMPLATES",
           "DemoGenerator", "DemoPairs", "generate_pairs", "generate_reference", "train_demo_mapper",
           "write_demo_stores"]

DEMO_MODEL = "cfbd-fast-demo"
# The mapping network the demo trains on its reference split: a linear map (depth 1) trains in seconds on a
# CPU and ranks poisons as well as the default 2-layer MLP does on this data.
DEMO_MAPPER_OPTIONS = {"depth": 1, "batch_size": 128, "lr": 3e-3, "epochs": 3, "max_rows": 20_000}


class DemoGenerator:
    """One split of a demo dataset; `rows(start, stop)` generates any range, identical whatever the chunking."""

    def __init__(self, rows: int, dim: int = 512, poison_rate: float = 0.001, hard_negative_rate: float = 0.001,
                 seed: int = 0, *, weak_rate: float = 0.1, concepts: int = 1000, split: int = 0):
        if rows < 1:
            raise InputError(f"demo rows must be at least 1, got {rows}")
        if not 0.0 <= weak_rate <= 1.0:
            raise InputError(f"weak_rate must be between 0 and 1, got {weak_rate}")
        self.total = int(rows)
        self.dim = int(dim)
        self.seed = int(seed)
        self.split = int(split)
        self.weak_rate = float(weak_rate)
        self._world = make_world(self.seed, self.dim, concepts)
        self._plan = make_plan(self.seed, self.split, self.total, poison_rate, hard_negative_rate)

    def __len__(self) -> int:
        return self.total

    def rows(self, start: int, stop: int) -> DemoPairs:
        """Rows [start, stop) of the split."""
        if not 0 <= start <= stop <= self.total:
            raise InputError(f"row range [{start}, {stop}) outside the demo's {self.total} rows")
        if start == stop:
            return _concat([], self.dim)
        first, last = start // BLOCK_ROWS, (stop - 1) // BLOCK_ROWS
        blocks = [generate_block(self._world, self._plan, self.seed, self.split, b, self.weak_rate)
                  for b in range(first, last + 1)]
        offset = start - first * BLOCK_ROWS
        return _slice(_concat(blocks, self.dim), offset, offset + stop - start)

    def chunks(self, rows: int = 65536):
        """Yields consecutive DemoPairs of at most `rows` rows covering the split."""
        for start in range(0, self.total, rows):
            yield self.rows(start, min(start + rows, self.total))


def _concat(blocks: list[DemoPairs], dim: int) -> DemoPairs:
    if len(blocks) == 1:
        return blocks[0]
    if not blocks:
        empty = np.zeros((0, dim), np.float32)
        return DemoPairs(empty, empty.copy(), [], [], np.zeros(0, bool), np.zeros(0, "<U13"), np.zeros(0, np.int32))
    return DemoPairs(
        image=np.concatenate([b.image for b in blocks]),
        text=np.concatenate([b.text for b in blocks]),
        caption=[c for b in blocks for c in b.caption],
        key=[k for b in blocks for k in b.key],
        is_poisoned=np.concatenate([b.is_poisoned for b in blocks]),
        kind=np.concatenate([b.kind for b in blocks]),
        concept=np.concatenate([b.concept for b in blocks]),
    )


def _slice(pairs: DemoPairs, start: int, stop: int) -> DemoPairs:
    return DemoPairs(pairs.image[start:stop], pairs.text[start:stop], pairs.caption[start:stop], pairs.key[start:stop],
                     pairs.is_poisoned[start:stop], pairs.kind[start:stop], pairs.concept[start:stop])


def generate_pairs(rows: int = 200_000, dim: int = 512, poison_rate: float = 0.001, hard_negative_rate: float = 0.001,
                   seed: int = 0, *, weak_rate: float = 0.1, concepts: int = 1000) -> DemoPairs:
    """The split to scan, in memory: poisons, hard negatives, weak captions and benign pairs."""
    return DemoGenerator(rows, dim, poison_rate, hard_negative_rate, seed, weak_rate=weak_rate,
                         concepts=concepts).rows(0, rows)


def generate_reference(rows: int = 100_000, dim: int = 512, seed: int = 0, *, weak_rate: float = 0.1,
                       concepts: int = 1000) -> DemoPairs:
    """A clean split from the same domain (same concepts, other rows) to train a mapping network on."""
    return DemoGenerator(rows, dim, 0.0, 0.0, seed, weak_rate=weak_rate, concepts=concepts, split=1).rows(0, rows)


def write_demo_stores(out_dir: str | Path, rows: int = 200_000, dim: int = 512, poison_rate: float = 0.001,
                      seed: int = 0, *, hard_negative_rate: float = 0.001, reference_rows: int | None = None,
                      weak_rate: float = 0.1, concepts: int = 1000, chunk_rows: int = 65536,
                      progress: bool = True) -> tuple[Path, Path]:
    """Writes `scan.cfbd` and `reference.cfbd` (fp16 stores) under out_dir, chunk by chunk; returns both paths.

    The reference split defaults to min(rows, 100,000) clean rows.
    """
    from .store import EmbeddingStore

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reference_rows = min(rows, 100_000) if reference_rows is None else int(reference_rows)
    splits = (
        ("scan", DemoGenerator(rows, dim, poison_rate, hard_negative_rate, seed, weak_rate=weak_rate,
                               concepts=concepts)),
        ("reference", DemoGenerator(reference_rows, dim, 0.0, 0.0, seed, weak_rate=weak_rate, concepts=concepts,
                                    split=1)),
    )
    paths = []
    for name, generator in splits:
        path = out_dir / f"{name}.cfbd"
        store = EmbeddingStore.create(path, dim, dtype="float16", model=DEMO_MODEL, pretrained=f"seed{seed}",
                                      normalized=True)
        with progress_bar(f"demo {name} data", len(generator), enabled=progress) as bar:
            for pairs in generator.chunks(chunk_rows):
                store.append(image=pairs.image.astype(np.float16), text=pairs.text.astype(np.float16),
                             meta=pairs.meta())
                bar.advance(len(pairs))
        close = getattr(store, "close", None)
        if close is not None:
            close()
        paths.append(path)
    return paths[0], paths[1]


def train_demo_mapper(reference_store: str | Path, seed: int = 0, *, progress: bool = False, device: str = "cpu",
                      **options):
    """The demo's mapping network: DEMO_MAPPER_OPTIONS (overridable) trained on a reference store's valid rows."""
    from .mapper import train_mapper
    from .pipeline.source import ChunkSource

    ref = ChunkSource(reference_store)
    return train_mapper(ref.store.image, ref.store.text, rows=ref.valid_rows(), seed=seed, device=device,
                        progress=progress, **ref.embedding_model, **{**DEMO_MAPPER_OPTIONS, **options})
