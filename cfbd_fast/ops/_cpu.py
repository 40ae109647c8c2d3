"""CPU paths of the ops: row blocks of a few MiB, converted to float32 one block at a time, one block per thread.

Each worker thread runs single-threaded torch ops on whole blocks: no thread barrier per op, which keeps the path fast
on a loaded machine. torch's intra-op thread count is set to 1 during a call (restored after) and the workers number
what it was, so `torch.set_num_threads` still bounds the threads used.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from .seed_correlation import inverse_seed_norms, mean_unit_seed

INF = float("inf")
NAN = float("nan")
_THREADS_LOCK = threading.Lock()  # one call at a time changes torch's thread count


def block_rows(dim: int, matrices: int = 1) -> int:
    """Rows per block: about 3 MiB of float32 per block of all matrices, a multiple of 16 and at least 16 rows.

    Measured on 1M x 512 fp16 consistency (2 cores): 1.5 MiB blocks 1.07 s, 3 MiB 0.61 s, 12 MiB 0.63 s;
    below 3 MiB the per-op overhead of torch dominates, above it the block no longer stays in cache.
    """
    return max(16, (3 << 20) // (4 * dim * matrices) // 16 * 16)


def _run_blocks(n_rows: int, step: int, work: Callable[[slice], None]) -> None:
    """Call `work(rows)` on every block of `step` rows, spread over torch.get_num_threads() threads."""
    blocks = [slice(start, start + step) for start in range(0, n_rows, step)]
    with _THREADS_LOCK:
        threads = torch.get_num_threads()
        if threads == 1 or len(blocks) < 2:
            for rows in blocks:
                work(rows)
            return
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(min(threads, len(blocks))) as pool:
                list(pool.map(work, blocks))  # re-raises a worker's exception here
        finally:
            torch.set_num_threads(threads)


def _valid(sumsq: torch.Tensor) -> torch.Tensor:
    return (sumsq > 0) & (sumsq < INF)


def consistency_cpu(image: torch.Tensor, text: torch.Tensor, generated: torch.Tensor):
    """(c, s_o, s_g) float32 for CPU tensors of any supported dtype and strides; one block in float32 at a time."""
    n_rows, dim = image.shape
    c, s_o, s_g = (torch.empty(n_rows, dtype=torch.float32) for _ in range(3))

    def work(rows: slice) -> None:
        i, t, g = image[rows].float(), text[rows].float(), generated[rows].float()
        ii, tt, gg = torch.linalg.vecdot(i, i), torch.linalg.vecdot(t, t), torch.linalg.vecdot(g, g)
        norm_i = ii.sqrt_()
        cos_o = torch.linalg.vecdot(i, t).div_(norm_i).div_(tt.sqrt()).clamp_min_(0)
        cos_g = torch.linalg.vecdot(i, g).div_(norm_i).div_(gg.sqrt()).clamp_min_(0)
        invalid = ~(_valid(ii) & _valid(tt) & _valid(gg))
        s_o[rows] = cos_o.masked_fill_(invalid, NAN)
        s_g[rows] = cos_g.masked_fill_(invalid, NAN)
        torch.sub(cos_g, cos_o, out=c[rows]).abs_()

    _run_blocks(n_rows, block_rows(dim, 3), work)
    return c, s_o, s_g


def row_health_cpu(x: torch.Tensor) -> torch.Tensor:
    """True where a row's float32 squared norm is zero or not finite (a zero row, or one holding NaN/inf)."""
    n_rows, dim = x.shape
    invalid = torch.empty(n_rows, dtype=torch.bool)

    def work(rows: slice) -> None:
        block = x[rows].float()
        invalid[rows] = ~_valid(torch.linalg.vecdot(block, block))

    _run_blocks(n_rows, block_rows(dim), work)
    return invalid


def seed_correlation_cpu(text: torch.Tensor, seeds: torch.Tensor, reduce: str = "mean",
                         k: int | None = None) -> torch.Tensor:
    """z float32 (N,): mean through the mean unit seed; max/top-k through a (block, q) float32 matmul per block."""
    n_rows, dim = text.shape
    z = torch.empty(n_rows, dtype=torch.float32)
    mean_seed = mean_unit_seed(seeds) if reduce == "mean" else None
    seeds_t = seeds.float().T.contiguous()
    inv_norm = inverse_seed_norms(seeds)

    def work(rows: slice) -> None:
        t = text[rows].float()
        sumsq = torch.linalg.vecdot(t, t)
        if reduce == "mean":
            total = t @ mean_seed
        else:
            scores = (t @ seeds_t).mul_(inv_norm)
            total = scores.amax(dim=1) if reduce == "max" else scores.topk(k, dim=1).values.mean(dim=1)
        z[rows] = total.div_(sumsq.sqrt()).masked_fill_(~_valid(sumsq), NAN)

    _run_blocks(n_rows, block_rows(dim), work)
    return z
