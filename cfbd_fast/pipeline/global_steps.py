"""The scan's global steps: what a stage decides from every row (counts, the rows with the largest c, random
samples, medians, nulls, cuts, GMM fits) and the few rows a stage reads by row id.

`GlobalSteps` is one process holding every row of one store: each step is the local numpy operation.
`distributed.global_steps.RankGlobalSteps` makes the same steps collectives over ranks, each rank holding its
share of the rows; the stages (paper.py, clusters.py, mapping.py) are written once against this interface.
Row ids are global: a rank's per-row arrays are indexed locally, the ids the steps take and return are not.
"""
from __future__ import annotations

import numpy as np

from ..detect import seeds, threshold


class GlobalSteps:
    """One process over the whole store `source` (a ChunkSource): global row ids are its row ids."""

    is_root = True

    def __init__(self, source):
        self.source = source  # what the passes read

    @property
    def total_rows(self) -> int:
        return self.source.rows

    @property
    def path(self):
        return self.source.path

    @property
    def identity(self) -> dict:
        return self.source.identity

    def checkpoint(self, stage: str) -> None:
        """Called before each stage (the distributed scan's tests stop a rank here)."""

    # -- rows ---------------------------------------------------------------------------------------------------
    def count(self, mask: np.ndarray) -> int:
        """How many rows of all processes are under `mask`."""
        return int(np.count_nonzero(mask))

    def sample_valid(self, valid: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
        """Sorted ids of `rng.choice(the valid rows, size, replace=False)` (all of them when fewer)."""
        return np.sort(rng.choice(np.flatnonzero(valid), size=min(size, self.count(valid)), replace=False))

    def top_rows(self, c: np.ndarray, valid: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids and c of the m largest c among the valid rows, ordered by (c descending, row id)."""
        rows = seeds.top_rows(c, valid, m)
        return rows, c[rows]

    def fetch(self, matrix: str, ids: np.ndarray) -> np.ndarray:
        """float32 rows of one matrix ("image", "text") at row ids, in the order asked."""
        return self.source.gather(matrix, ids)

    def values(self, array: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """A per-row array's values at row ids."""
        return array[ids]

    def captions(self, ids) -> list:
        """The metadata captions of rows (None where the store has no caption column)."""
        meta = self.source.meta
        if "caption" not in meta.column_names:
            return [None] * len(ids)
        return meta.column("caption").take(np.asarray(ids, dtype=np.int64)).to_pylist()

    def keys(self, ids: np.ndarray) -> list:
        return self.source.keys.take(np.asarray(ids, dtype=np.int64)).to_pylist()

    def mark(self, array: np.ndarray, ids: np.ndarray, value) -> None:
        """Set a per-row array at row ids (on the process that holds each row)."""
        array[ids] = value

    def in_row_order(self, mask: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
        """Each per-row array at the rows under `mask`, all processes' rows in row-id order (gathered)."""
        return [a[mask] for a in arrays]

    # -- statistics over all rows ------------------------------------------------------------------------------
    def median(self, values: np.ndarray):
        """np.median of all processes' values."""
        return np.median(values)

    def lowest(self, values: np.ndarray) -> float:
        """The smallest of all processes' values (inf when there are none)."""
        return float(np.min(values)) if len(values) else float("inf")

    def highest(self, values: np.ndarray) -> float:
        """The largest of all processes' values (-inf when there are none)."""
        return float(np.max(values)) if len(values) else float("-inf")

    def bincount(self, codes: np.ndarray, n: int) -> np.ndarray:
        return np.bincount(codes, minlength=n)

    def slowest(self, seconds: list[float]) -> np.ndarray:
        """Per-stage wall times: the slowest process's."""
        return np.asarray(seconds, dtype=np.float64)

    def fit_gmm(self, values: np.ndarray, mask: np.ndarray, *, k: int, seed: int, device: str = "cpu"):
        """fit_gmm of all processes' values; `values` are x[mask] of this process's rows. On a CUDA device the EM
        passes run there (gmm.device)."""
        if str(device).startswith("cuda"):
            from ..gmm.device import fit_gmm_device

            return fit_gmm_device(values, k=k, seed=seed, device=device)
        from ..gmm import fit_gmm

        return fit_gmm(values, k=k, seed=seed)

    def null_pvalues(self, score: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, dict]:
        """detect.threshold.null_pvalues: the null fitted on all processes' reference rows, local p-values."""
        return threshold.null_pvalues(score, reference)

    def control(self, method: str, p: np.ndarray, level: float) -> tuple[np.ndarray, float]:
        """Benjamini-Hochberg (`fdr`) or Bonferroni (`fwer`) over all processes' p-values: local rejections and
        the p-value cut."""
        if method == "fdr":
            return threshold.benjamini_hochberg(p, level)
        return threshold.family_wise(p, level)

    def estimate(self, score: np.ndarray, method: str, *, reference: np.ndarray, fpr: float, seed: int) -> float:
        """detect.threshold.estimate over all processes' scores."""
        return threshold.estimate(score, method, reference=reference, fpr=fpr, seed=seed)
