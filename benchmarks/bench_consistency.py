"""Benchmark of cfbd_fast.ops.consistency against chunked torch (F.normalize + row-wise dots, float32), and numpy.

The baseline is what a competent user writes: per chunk of rows, convert to float32, torch.nn.functional.normalize
each matrix, row-wise dots, on the same device as ours; numpy the same way (CPU only) is a second column. The
baselines run at each chunk size given (on the CPU a cache-sized chunk beats the scan's 16,384 rows several times
over) and speedups are against the fastest torch baseline. All providers run in one process with one thread count
(--threads; by default the project's rule, the cores not kept busy by other processes: torch's default of one
thread per core slows every provider several times over on a shared machine), interleaved round by round; the
table gives the median and min-max of the rounds and each provider's peak working memory above the inputs (RSS on
the CPU, allocated device memory on CUDA).

    python benchmarks/bench_consistency.py                          # CPU: 1,000,000 x 512 fp16, 5 rounds
    python benchmarks/bench_consistency.py --device cuda            # Triton: 3,000,000 x 1024 fp16, 20 rounds
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import (BASELINE, append_results, check_agreement, interleaved, make_inputs, report,  # noqa: E402
                     set_threads)

TARGET_CPU = 3.0  # consistency: at least 3x the chunked torch baseline on the CPU


def torch_chunked_consistency(image, text, generated, chunk_rows: int):
    """The baseline: per chunk, float32 rows normalised with F.normalize, then row-wise dots; outputs on the device."""
    import torch
    import torch.nn.functional as F

    n = image.shape[0]
    c, s_o, s_g = (torch.empty(n, dtype=torch.float32, device=image.device) for _ in range(3))
    for lo in range(0, n, chunk_rows):
        hi = min(n, lo + chunk_rows)
        i, t, g = (F.normalize(x[lo:hi].float(), dim=1) for x in (image, text, generated))
        torch.sum(i * t, dim=1, out=s_o[lo:hi]).clamp_min_(0)
        torch.sum(i * g, dim=1, out=s_g[lo:hi]).clamp_min_(0)
        torch.sub(s_g[lo:hi], s_o[lo:hi], out=c[lo:hi]).abs_()
    return c, s_o, s_g


def numpy_chunked_consistency(image, text, generated, chunk_rows: int):
    """The same baseline in numpy: per chunk, float32 rows divided by their norms, then row-wise dots."""
    n = image.shape[0]
    c, s_o, s_g = (np.empty(n, dtype=np.float32) for _ in range(3))
    for lo in range(0, n, chunk_rows):
        hi = min(n, lo + chunk_rows)
        unit = []
        for x in (image, text, generated):
            x = x[lo:hi].astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            unit.append(x)
        s_o[lo:hi] = np.maximum(np.einsum("ij,ij->i", unit[0], unit[1]), 0)
        s_g[lo:hi] = np.maximum(np.einsum("ij,ij->i", unit[0], unit[2]), 0)
        c[lo:hi] = np.abs(s_g[lo:hi] - s_o[lo:hi])
    return c, s_o, s_g


def bench(device: str, rows: int, dim: int, repeat: int, chunks: list[int]) -> list[dict]:
    import torch

    from cfbd_fast import ops

    arrays = make_inputs(rows, dim, 3)
    tensors = [torch.from_numpy(a).to(device) for a in arrays]
    if device == "cuda":
        del arrays
    providers = {"cfbd_fast": lambda: ops.consistency(*tensors)}
    for chunk in chunks:
        providers[f"{BASELINE}/{chunk}"] = lambda chunk=chunk: torch_chunked_consistency(*tensors, chunk)
    if device == "cpu":
        for chunk in chunks:
            providers[f"numpy-chunked/{chunk}"] = lambda chunk=chunk: numpy_chunked_consistency(*arrays, chunk)
    for name in providers:
        check_agreement(providers["cfbd_fast"](), providers[name]())
    measured = interleaved(providers, repeat, device)
    return report("consistency", device, rows, dim, repeat, measured,
                  bytes_moved=3 * rows * dim * 2 + 3 * rows * 4,  # three fp16 matrices read, three float32 written
                  target=TARGET_CPU if device == "cpu" else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rows", type=int, default=None, help="default 1,000,000 (cpu) or 3,000,000 (cuda)")
    parser.add_argument("--dim", type=int, default=None, help="default 512 (cpu) or 1024 (cuda)")
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
                  repeat, args.chunk_rows or ([262_144] if cuda else [1024, 16_384]))
    append_results("consistency", [{**row, "threads": threads} for row in table])


if __name__ == "__main__":
    main()
