"""Benchmark of cfbd_fast.ops.seed_correlation: CPU path vs plain numpy, or (--device cuda) Triton vs eager torch.

CPU: 1M x 512 fp16 captions against q=50 seeds (the paper's seed-set size); the numpy baseline converts the captions to
float32, normalises them and the seeds, and reduces the N x q cosine matrix. Each provider and reduction runs in its
own child process. CUDA: 3M x 1024 fp16, do_bench medians; the mean is a streaming dot, so its achieved bandwidth is
reported as a fraction of the measured device copy bandwidth (bytes read + written).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results, child_peak_rss_mb, machine, print_table, run_child  # noqa: E402
from bench_consistency import copy_bandwidth_gbs  # noqa: E402

REDUCES = (("mean", None), ("max", None), ("topk", 5))


def _make_inputs(rows: int, dim: int, n_seeds: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    text = np.empty((rows, dim), dtype=np.float16)
    for start in range(0, rows, 1 << 16):
        text[start:start + (1 << 16)] = rng.standard_normal((min(1 << 16, rows - start), dim), dtype=np.float32)
    return text, rng.standard_normal((n_seeds, dim), dtype=np.float32).astype(np.float16)


def numpy_correlation(text, seeds, reduce, k):
    """The plain numpy baseline: normalise both matrices (in float32), then reduce the N x q cosines."""
    t = text.astype(np.float32)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    s = seeds.astype(np.float32)
    s /= np.linalg.norm(s, axis=1, keepdims=True)
    cos = t @ s.T
    if reduce == "mean":
        return cos.mean(axis=1)
    if reduce == "max":
        return cos.max(axis=1)
    return np.partition(cos, -k, axis=1)[:, -k:].mean(axis=1)


def _child(provider: str, reduce: str, rows: int, dim: int, n_seeds: int, repeat: int) -> None:
    from cfbd_fast import ops

    text, seeds = _make_inputs(rows, dim, n_seeds)
    k = 5 if reduce == "topk" else None
    run = {"cfbd_fast-cpu": ops.seed_correlation, "numpy": numpy_correlation}[provider]
    run(text[:1000], seeds, reduce, k)  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run(text, seeds, reduce, k)
        times.append(time.perf_counter() - start)
    print(json.dumps({"median_s": float(np.median(times)), "min_s": min(times), "child_rss_mb": child_peak_rss_mb()}))


def bench_cpu(rows: int, dim: int, n_seeds: int, repeat: int) -> list[dict]:
    table = []
    for reduce, k in REDUCES:
        results = {p: run_child(__file__, p, reduce, str(rows), str(dim), str(n_seeds), str(repeat))
                   for p in ("cfbd_fast-cpu", "numpy")}
        base = results["numpy"]["median_s"]
        table += [{"provider": p, "reduce": reduce + (f" k={k}" if k else ""), "rows": rows, "dim": dim,
                   "seeds": n_seeds, "dtype": "fp16", "median_s": r["median_s"], "min_s": r["min_s"],
                   "Mrows_per_s": rows / r["median_s"] / 1e6, "speedup_vs_numpy": base / r["median_s"],
                   "peak_rss_mb": r["peak_rss_mb"]} for p, r in results.items()]
    print_table(f"seed_correlation, CPU ({machine()}), target >= 3x numpy", table,
                ["provider", "reduce", "rows", "dim", "seeds", "dtype", "median_s", "min_s", "Mrows_per_s",
                 "speedup_vs_numpy", "peak_rss_mb"])
    return table


def bench_cuda(rows: int, dim: int, n_seeds: int) -> list[dict]:
    import torch
    import torch.nn.functional as F
    import triton.testing

    from cfbd_fast import ops

    gen = torch.Generator(device="cuda").manual_seed(0)
    text = torch.randn(rows, dim, device="cuda", generator=gen, dtype=torch.float16)
    seeds = torch.randn(n_seeds, dim, device="cuda", generator=gen, dtype=torch.float16)

    def eager(reduce, k):
        cos = (F.normalize(text, dim=1) @ F.normalize(seeds, dim=1).T).float()
        if reduce == "mean":
            return cos.mean(1)
        return cos.max(1).values if reduce == "max" else cos.topk(k, dim=1).values.mean(1)

    copy_gbs = copy_bandwidth_gbs()
    bytes_moved = rows * dim * 2 + rows * 4  # the captions read once, z written
    table = []
    for reduce, k in REDUCES:
        runs = {"cfbd_fast-triton": lambda: ops.seed_correlation(text, seeds, reduce, k),
                "torch-eager": lambda: eager(reduce, k)}
        rows_here = []
        for provider, fn in runs.items():
            median, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
            gbs = bytes_moved / (median * 1e-3) / 1e9
            rows_here.append({"provider": provider, "reduce": reduce + (f" k={k}" if k else ""), "rows": rows,
                              "dim": dim, "seeds": n_seeds, "median_ms": median, "p20_ms": p20, "p80_ms": p80,
                              "GB_per_s": gbs, "copy_GB_per_s": copy_gbs, "fraction_of_copy_bw": gbs / copy_gbs})
        for row in rows_here:
            row["speedup_vs_eager"] = rows_here[1]["median_ms"] / row["median_ms"]
        table += rows_here
    print_table(f"seed_correlation, CUDA ({machine()}), targets >= 2x eager and >= 0.7 of copy bandwidth (mean)",
                table, ["provider", "reduce", "rows", "dim", "seeds", "median_ms", "p20_ms", "p80_ms", "GB_per_s",
                        "copy_GB_per_s", "fraction_of_copy_bw", "speedup_vs_eager"])
    return table


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        provider, reduce, rows, dim, n_seeds, repeat = sys.argv[2:8]
        _child(provider, reduce, int(rows), int(dim), int(n_seeds), int(repeat))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rows", type=int, default=None, help="default 1,000,000 (cpu) or 3,000,000 (cuda)")
    parser.add_argument("--dim", type=int, default=None, help="default 512 (cpu) or 1024 (cuda)")
    parser.add_argument("--seeds", type=int, default=50, help="seed-set size q")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per CPU provider (median reported)")
    args = parser.parse_args()
    if args.device == "cpu":
        table = bench_cpu(args.rows or 1_000_000, args.dim or 512, args.seeds, args.repeat)
    else:
        table = bench_cuda(args.rows or 3_000_000, args.dim or 1024, args.seeds)
    append_results("correlation", [{**row, "device": args.device} for row in table])


if __name__ == "__main__":
    main()
