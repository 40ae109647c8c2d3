"""Benchmark of cfbd_fast.ops.seed_correlation against chunked torch (F.normalize, float32), and numpy.

Captions (N x D fp16) against q=50 seeds, the paper's seed-set size; reductions mean, max and top-5 mean. The
baseline is what a competent user writes, per chunk of rows on the same device as ours: F.normalize the float32
captions, then for `mean` one dot with the mean of the unit seeds (mean_j cos(t, s_j) = t_hat . mean_j s_hat_j),
for `max`/`topk` a matmul with the unit seeds and the reduction; numpy the same way (CPU only) is a second column.
Chunk sizes, thread count, interleaving and the columns are as in bench_consistency.py.

    python benchmarks/bench_seed_correlation.py                 # CPU: 1,000,000 x 512 fp16, 5 rounds
    python benchmarks/bench_seed_correlation.py --device cuda   # Triton: 3,000,000 x 1024 fp16, 20 rounds
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import (BASELINE, append_results, check_agreement, interleaved, make_inputs, report,  # noqa: E402
                     set_threads)

REDUCES = (("mean", None), ("max", None), ("topk", 5))  # (reduce, topk)


def torch_chunked_correlation(text, seeds, reduce: str, topk: int | None, chunk_rows: int):
    """The baseline: per chunk, F.normalize the float32 captions; mean through the mean unit seed, max/top-k through
    the chunk's cosine matrix with the unit seeds."""
    import torch
    import torch.nn.functional as F

    unit_seeds = F.normalize(seeds.float(), dim=1)
    mean_seed = unit_seeds.mean(dim=0)
    z = torch.empty(text.shape[0], dtype=torch.float32, device=text.device)
    for lo in range(0, text.shape[0], chunk_rows):
        t = F.normalize(text[lo:lo + chunk_rows].float(), dim=1)
        if reduce == "mean":
            torch.mv(t, mean_seed, out=z[lo:lo + chunk_rows])
            continue
        cos = t @ unit_seeds.T
        z[lo:lo + chunk_rows] = cos.amax(dim=1) if reduce == "max" else cos.topk(topk, dim=1).values.mean(dim=1)
    return z


def numpy_chunked_correlation(text, seeds, reduce: str, topk: int | None, chunk_rows: int):
    """The same baseline in numpy."""
    unit_seeds = seeds.astype(np.float32)
    unit_seeds /= np.linalg.norm(unit_seeds, axis=1, keepdims=True)
    mean_seed = unit_seeds.mean(axis=0)
    z = np.empty(text.shape[0], dtype=np.float32)
    for lo in range(0, text.shape[0], chunk_rows):
        t = text[lo:lo + chunk_rows].astype(np.float32)
        t /= np.linalg.norm(t, axis=1, keepdims=True)
        if reduce == "mean":
            z[lo:lo + chunk_rows] = t @ mean_seed
            continue
        cos = t @ unit_seeds.T
        z[lo:lo + chunk_rows] = (cos.max(axis=1) if reduce == "max"
                                 else np.partition(cos, -topk, axis=1)[:, -topk:].mean(axis=1))
    return z


def bench(device: str, rows: int, dim: int, n_seeds: int, repeat: int, chunks: list[int]) -> list[dict]:
    import torch

    from cfbd_fast import ops

    (text_np,) = make_inputs(rows, dim, 1)
    seeds_np = np.random.default_rng(1).standard_normal((n_seeds, dim), dtype=np.float32).astype(np.float16)
    text, seeds = torch.from_numpy(text_np).to(device), torch.from_numpy(seeds_np).to(device)
    if device == "cuda":
        del text_np
    table = []
    for reduce, topk in REDUCES:
        providers = {"cfbd_fast": lambda: ops.seed_correlation(text, seeds, reduce, topk)}
        for chunk in chunks:
            providers[f"{BASELINE}/{chunk}"] = (
                lambda chunk=chunk: torch_chunked_correlation(text, seeds, reduce, topk, chunk))
        if device == "cpu":
            for chunk in chunks:
                providers[f"numpy-chunked/{chunk}"] = (
                    lambda chunk=chunk: numpy_chunked_correlation(text_np, seeds_np, reduce, topk, chunk))
        for name in providers:
            check_agreement([providers["cfbd_fast"]()], [providers[name]()])
        measured = interleaved(providers, repeat, device)
        table += report("seed_correlation", device, rows, dim, repeat, measured,
                        bytes_moved=rows * dim * 2 + rows * 4,  # the captions read once, z written
                        target=None, reduce=reduce + (f" topk={topk}" if topk else ""), seeds=n_seeds)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rows", type=int, default=None, help="default 1,000,000 (cpu) or 3,000,000 (cuda)")
    parser.add_argument("--dim", type=int, default=None, help="default 512 (cpu) or 1024 (cuda)")
    parser.add_argument("--seeds", type=int, default=50, help="seed-set size (the paper's q)")
    parser.add_argument("--repeat", type=int, default=None, help="interleaved rounds, default 5 (cpu) or 20 (cuda)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every provider; default: cores minus the load average")
    parser.add_argument("--chunk-rows", type=int, nargs="+", default=None,
                        help="the baselines' chunk sizes, default 1,024 and 16,384 (cpu; the second is the scan's "
                             "chunk) or 262,144 (cuda)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    repeat = args.repeat or (20 if cuda else 5)
    if repeat < 5:
        parser.error("--repeat must be at least 5: medians of fewer rounds on a shared machine mean little")
    threads = set_threads(args.threads)
    table = bench(args.device, args.rows or (3_000_000 if cuda else 1_000_000), args.dim or (1024 if cuda else 512),
                  args.seeds, repeat, args.chunk_rows or ([262_144] if cuda else [1024, 16_384]))
    append_results("seed_correlation", [{**row, "threads": threads} for row in table])


if __name__ == "__main__":
    main()
