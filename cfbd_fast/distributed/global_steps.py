"""The scan's global steps over ranks (pipeline.global_steps.GlobalSteps made collective): counts and statistics
from all-reduced numbers and exact selection, the rows with the largest c and the rows a stage reads by id
gathered from the ranks that hold them, so that every rank makes the same decision one process makes."""
from __future__ import annotations

import numpy as np

from ..detect import seeds
from ..pipeline.global_steps import GlobalSteps
from . import select, threshold as dthr
from .comm import Comm, test_hook
from .gmm import fit_gmm_sharded
from .rows import RankRows


class RankGlobalSteps(GlobalSteps):
    """One rank's rows (`part`) among all ranks' (`comm`); row ids are global, per-row arrays local."""

    def __init__(self, comm: Comm, part: RankRows):
        super().__init__(part)
        self.comm, self.part = comm, part

    @property
    def is_root(self) -> bool:
        return self.comm.is_root

    @property
    def total_rows(self) -> int:
        return self.part.total_rows

    def checkpoint(self, stage: str) -> None:
        test_hook(stage, self.comm)

    # -- rows ---------------------------------------------------------------------------------------------------
    def count(self, mask: np.ndarray) -> int:
        return int(self.comm.sum(np.array([int(np.count_nonzero(mask))], dtype=np.int64), "count rows")[0])

    def positions(self, mask: np.ndarray) -> list[tuple[int, int, int]]:
        """Where this rank's rows under `mask` lie in the global order of all ranks' masked rows:
        (global position, position among this rank's masked rows, length), one per segment."""
        segs = self.part.segments
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
        n_valid = self.count(valid)
        picks = rng.choice(n_valid, size=min(size, n_valid), replace=False)  # the positions one process draws
        local_valid = np.flatnonzero(valid)
        ids = np.full(len(picks), -1, dtype=np.int64)
        for global_pos, local_pos, length in self.positions(valid):
            inside = (picks >= global_pos) & (picks < global_pos + length)
            ids[inside] = self.part.global_ids(local_valid[local_pos + picks[inside] - global_pos])
        return np.sort(self.comm.max(ids, "share the sample's row ids"))

    def top_rows(self, c: np.ndarray, valid: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        local = seeds.top_rows(c, valid, m)
        pieces = self.comm.gather_objects((self.part.global_ids(local), c[local]), "gather the top rows")
        ids = np.concatenate([p[0] for p in pieces])
        cs = np.concatenate([p[1] for p in pieces])
        order = np.lexsort((ids, -cs))[:m]
        return ids[order], cs[order]

    def _gather(self, ids: np.ndarray, take, what: str) -> list:
        """(positions in `ids`, values) from every rank, for the ids each holds."""
        mask, local = self.part.owned(ids)
        return self.comm.gather_objects((np.flatnonzero(mask), take(local[mask])), what)

    def fetch(self, matrix: str, ids: np.ndarray) -> np.ndarray:
        out = np.empty((len(ids), self.part.dim), dtype=np.float32)
        for at, rows in self._gather(ids, lambda local: self.part.gather(matrix, local), f"share {matrix} rows"):
            out[at] = rows
        return out

    def values(self, array: np.ndarray, ids: np.ndarray) -> np.ndarray:
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
        return self._texts(ids, self.part.captions, "share captions")

    def keys(self, ids: np.ndarray) -> list:
        return self._texts(ids, lambda local: self.part.keys.take(local).to_pylist(), "share keys")

    def mark(self, array: np.ndarray, ids: np.ndarray, value) -> None:
        mask, local = self.part.owned(ids)
        array[local[mask]] = value

    def in_row_order(self, mask: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
        pieces = self.comm.gather_objects((self.part.global_ids(np.flatnonzero(mask)), *(a[mask] for a in arrays)),
                                          "gather rows in order")
        order = np.argsort(np.concatenate([p[0] for p in pieces]), kind="stable")
        return [np.concatenate([p[i] for p in pieces])[order] for i in range(1, len(arrays) + 1)]

    # -- statistics over all rows ------------------------------------------------------------------------------
    def median(self, values: np.ndarray):
        return select.median(self.comm, values)

    def lowest(self, values: np.ndarray) -> float:
        return float(self.comm.min(np.array([values.min() if len(values) else np.inf]), "smallest value")[0])

    def highest(self, values: np.ndarray) -> float:
        return float(self.comm.max(np.array([values.max() if len(values) else -np.inf]), "largest value")[0])

    def bincount(self, codes: np.ndarray, n: int) -> np.ndarray:
        return self.comm.sum(np.bincount(codes, minlength=n).astype(np.int64), "count codes")

    def slowest(self, seconds: list[float]) -> np.ndarray:
        return self.comm.max(np.asarray(seconds, dtype=np.float64), "stage times")

    def fit_gmm(self, values: np.ndarray, mask: np.ndarray, *, k: int, seed: int, device: str = "cpu"):
        """The EM's passes run on the CPU kernels here, their statistics all-reduced (gmm.py)."""
        return fit_gmm_sharded(self.comm, values, self.positions(mask), k=k, seed=seed)

    def null_pvalues(self, score: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, dict]:
        return dthr.null_pvalues(self.comm, score, reference)

    def control(self, method: str, p: np.ndarray, level: float) -> tuple[np.ndarray, float]:
        if method == "fdr":
            return dthr.benjamini_hochberg(self.comm, p, level)
        return dthr.family_wise(self.comm, p, level)

    def estimate(self, score: np.ndarray, method: str, *, reference: np.ndarray, fpr: float, seed: int) -> float:
        positions = self.positions(np.isfinite(score)) if method == "mixture" else None
        return float(dthr.estimate(self.comm, score, method, reference=reference, fpr=fpr, seed=seed,
                                   positions=positions))
