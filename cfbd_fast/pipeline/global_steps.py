"""The scan's global steps: what a stage decides from every row (counts, the rows with the largest c, random
samples, medians, nulls, cuts, GMM fits) and the few rows a stage reads by row id.

`GlobalSteps` is one process's rows (a `ChunkSource`) among all processes' (a `Comm`): every step is written once,
with collectives, so that each rank makes the decision one process over all rows makes. A world of one (the
default `Comm()`, every collective the identity) keeps its fast paths: numpy's medians and quantiles
(distributed/select.py) and the GMM on the scan's device. The stages (paper.py, clusters.py, mapping.py) are
written against this interface. Row ids are global: per-row arrays are indexed locally, the ids the steps take
and return are not.
"""
from __future__ import annotations

import numpy as np

from ..detect import seeds, threshold
from ..distributed import select
from ..distributed.comm import Comm, test_hook


class GlobalSteps:
    """This process's rows (`source`) among all processes' (`comm`)."""

    def __init__(self, source, comm: Comm | None = None):
        self.source = source  # what the passes read
        self.comm = comm or Comm()

    @property
    def is_root(self) -> bool:
        return self.comm.is_root

    @property
    def total_rows(self) -> int:
        return self.source.total_rows

    @property
    def path(self):
        return self.source.path

    @property
    def identity(self) -> dict:
        return self.source.identity

    def checkpoint(self, stage: str) -> None:
        """Called before each stage (the distributed scan's tests stop a rank here)."""
        test_hook(stage, self.comm)

    # -- rows ---------------------------------------------------------------------------------------------------
    def count(self, mask: np.ndarray) -> int:
        """How many rows of all processes are under `mask`."""
        return int(self.comm.sum(np.array([int(np.count_nonzero(mask))], dtype=np.int64), "count rows")[0])

    def positions(self, mask: np.ndarray) -> list[tuple[int, int, int]]:
        """Where this process's rows under `mask` lie in the global order of all processes' masked rows:
        (global position, position among this process's masked rows, length), one per segment."""
        segs = self.source.segments
        counts = [int(np.count_nonzero(mask[s.local_start:s.local_start + len(s)])) for s in segs]
        every = sorted(x for rank in self.comm.gather_objects([(s.global_start, c) for s, c in zip(segs, counts)],
                                                              "segment counts") for x in rank)
        offset, start_of = 0, {}
        for global_start, c in every:
            start_of[global_start] = offset
            offset += c
        out, local = [], 0
        for s, c in zip(segs, counts):
            out.append((start_of[s.global_start], local, c))
            local += c
        return out

    def sample_valid(self, valid: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
        """Sorted ids of `rng.choice(all valid rows, size, replace=False)` (all of them when fewer)."""
        n_valid = self.count(valid)
        picks = rng.choice(n_valid, size=min(size, n_valid), replace=False)  # the positions one process draws
        local_valid = np.flatnonzero(valid)
        ids = np.full(len(picks), -1, dtype=np.int64)
        for global_pos, local_pos, length in self.positions(valid):
            inside = (picks >= global_pos) & (picks < global_pos + length)
            ids[inside] = self.source.global_ids(local_valid[local_pos + picks[inside] - global_pos])
        return np.sort(self.comm.max(ids, "share the sample's row ids"))

    def top_rows(self, c: np.ndarray, valid: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids and c of the m largest c among the valid rows, ordered by (c descending, row id)."""
        local = seeds.top_rows(c, valid, m)
        pieces = self.comm.gather_objects((self.source.global_ids(local), c[local]), "gather the top rows")
        ids = np.concatenate([p[0] for p in pieces])
        cs = np.concatenate([p[1] for p in pieces])
        order = np.lexsort((ids, -cs))[:m]
        return ids[order], cs[order]

    def _gather(self, ids: np.ndarray, take, what: str) -> list:
        """(positions in `ids`, values) from every process, for the ids each holds."""
        mask, local = self.source.owned(ids)
        return self.comm.gather_objects((np.flatnonzero(mask), take(local[mask])), what)

    def fetch(self, matrix: str, ids: np.ndarray) -> np.ndarray:
        """float32 rows of one matrix ("image", "text") at row ids, in the order asked."""
        out = np.empty((len(ids), self.source.dim), dtype=np.float32)
        for at, rows in self._gather(ids, lambda local: self.source.gather(matrix, local), f"share {matrix} rows"):
            out[at] = rows
        return out

    def values(self, array: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """A per-row array's values at row ids."""
        out = np.empty(len(ids), dtype=array.dtype)
        for at, vals in self._gather(ids, lambda local: array[local], "share per-row values"):
            out[at] = vals
        return out

    def _texts(self, ids, take, what: str) -> list:
        out = [None] * len(ids)
        for at, vals in self._gather(np.asarray(ids, dtype=np.int64), take, what):
            for i, v in zip(at, vals):
                out[i] = v
        return out

    def captions(self, ids) -> list:
        """The metadata captions of rows (None where the store has no caption column)."""
        return self._texts(ids, self.source.captions, "share captions")

    def keys(self, ids: np.ndarray) -> list:
        return self._texts(ids, lambda local: self.source.keys.take(local).to_pylist(), "share keys")

    def mark(self, array: np.ndarray, ids: np.ndarray, value) -> None:
        """Set a per-row array at row ids (on the process that holds each row)."""
        mask, local = self.source.owned(ids)
        array[local[mask]] = value

    def in_row_order(self, mask: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
        """Each per-row array at the rows under `mask`, all processes' rows in row-id order (gathered)."""
        if self.comm.world == 1:  # one process: its rows are in row-id order
            return [a[mask] for a in arrays]
        pieces = self.comm.gather_objects((self.source.global_ids(np.flatnonzero(mask)),
                                           *(a[mask] for a in arrays)), "gather rows in order")
        order = np.argsort(np.concatenate([p[0] for p in pieces]), kind="stable")
        return [np.concatenate([p[i] for p in pieces])[order] for i in range(1, len(arrays) + 1)]

    # -- statistics over all rows ------------------------------------------------------------------------------
    def median(self, values: np.ndarray):
        """np.median of all processes' values."""
        return select.median(self.comm, values)

    def lowest(self, values: np.ndarray) -> float:
        """The smallest of all processes' values (inf when there are none)."""
        return float(self.comm.min(np.array([values.min() if len(values) else np.inf]), "smallest value")[0])

    def highest(self, values: np.ndarray) -> float:
        """The largest of all processes' values (-inf when there are none)."""
        return float(self.comm.max(np.array([values.max() if len(values) else -np.inf]), "largest value")[0])

    def bincount(self, codes: np.ndarray, n: int) -> np.ndarray:
        return self.comm.sum(np.bincount(codes, minlength=n).astype(np.int64), "count codes")

    def slowest(self, seconds: list[float]) -> np.ndarray:
        """Per-stage wall times: the slowest process's."""
        return self.comm.max(np.asarray(seconds, dtype=np.float64), "stage times")

    def fit_gmm(self, values: np.ndarray, mask: np.ndarray, *, k: int, seed: int, device: str = "cpu"):
        """fit_gmm of all processes' values; `values` are x[mask] of this process's rows. One process on a CUDA
        device runs the EM passes there (gmm.device); ranks all-reduce the CPU passes' sums (gmm.fit_gmm_ranks)."""
        from ..gmm.em import fit_gmm, fit_gmm_ranks

        if self.comm.world > 1:
            return fit_gmm_ranks(self.comm, values, self.positions(mask), k=k, seed=seed)
        if str(device).startswith("cuda"):
            from ..gmm.device import fit_gmm_device

            return fit_gmm_device(values, k=k, seed=seed, device=device)
        return fit_gmm(values, k=k, seed=seed)

    def null_pvalues(self, score: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, dict]:
        """detect.threshold.null_pvalues: the null fitted on all processes' reference rows, local p-values."""
        return threshold.null_pvalues(score, reference, comm=self.comm)

    def control(self, method: str, p: np.ndarray, level: float) -> tuple[np.ndarray, float]:
        """Benjamini-Hochberg (`fdr`) or Bonferroni (`fwer`) over all processes' p-values: local rejections and
        the p-value cut."""
        if method == "fdr":
            return threshold.benjamini_hochberg(p, level, comm=self.comm)
        return threshold.family_wise(p, level, comm=self.comm)

    def estimate(self, score: np.ndarray, method: str, *, reference: np.ndarray, fpr: float, seed: int) -> float:
        """detect.threshold.estimate over all processes' scores."""
        positions = self.positions(np.isfinite(score)) if method == "mixture" and self.comm.world > 1 else None
        return threshold.estimate(score, method, reference=reference, fpr=fpr, seed=seed, comm=self.comm,
                                  positions=positions)

    # -- samples of rows for fits --------------------------------------------------------------------------------
    def sample_rows(self, size: int, seed: int, matrices: tuple[str, ...]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Up to `size` random rows of all processes (sorted ids, drawn as one process draws them) whose vectors
        are finite with a non-zero norm in every matrix, fetched to every process: the sample a self-fitted or
        kNN mapper is built on."""
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(self.total_rows, size=min(size, self.total_rows), replace=False))
        arrays = [self.fetch(m, rows) for m in matrices]
        ok = np.ones(len(rows), dtype=bool)
        for a in arrays:
            ok &= np.isfinite(a).all(axis=1) & (np.abs(a).sum(axis=1) > 0)
        return rows[ok], [a[ok] for a in arrays]
