"""Benchmark of cfbd_fast.ops.consistency: CPU path vs plain numpy, or (--device cuda) Triton vs eager torch.

CPU: 1M x 512 fp16 (image, caption, generated caption); the baseline converts each matrix to float32, normalises it
and takes row-wise dots (numpy has no fast float16 arithmetic). Each provider runs in its own child process, so the
table's peak RSS is its own. CUDA: 3M x 1024 fp16, triton.testing.do_bench medians, achieved bandwidth as a fraction
of the measured device-to-device copy bandwidth (bytes read + written by the kernel).
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


def _make_inputs(rows: int, dim: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(3):
        x = np.empty((rows, dim), dtype=np.float16)
        for start in range(0, rows, 1 << 16):
            x[start:start + (1 << 16)] = rng.standard_normal((min(1 << 16, rows - start), dim), dtype=np.float32)
        out.append(x)
    return out


def numpy_consistency(image, text, generated):
    """The plain numpy baseline: normalise each matrix (in float32), then row-wise dots."""
    unit = []
    for x in (image, text, generated):
        x = x.astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        unit.append(x)
    s_o = np.maximum(np.einsum("ij,ij->i", unit[0], unit[1]), 0)
    s_g = np.maximum(np.einsum("ij,ij->i", unit[0], unit[2]), 0)
    return np.abs(s_g - s_o), s_o, s_g


def _child(provider: str, rows: int, dim: int, repeat: int) -> None:
    from cfbd_fast import ops

    inputs = _make_inputs(rows, dim)
    run = {"cfbd_fast-cpu": ops.consistency, "numpy": numpy_consistency}[provider]
    run(*(x[:1000] for x in inputs))  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run(*inputs)
        times.append(time.perf_counter() - start)
    print(json.dumps({"median_s": float(np.median(times)), "min_s": min(times), "child_rss_mb": child_peak_rss_mb()}))


def bench_cpu(rows: int, dim: int, repeat: int) -> list[dict]:
    results = {p: run_child(__file__, p, str(rows), str(dim), str(repeat)) for p in ("cfbd_fast-cpu", "numpy")}
    base = results["numpy"]["median_s"]
    table = [{"provider": p, "rows": rows, "dim": dim, "dtype": "fp16", "median_s": r["median_s"], "min_s": r["min_s"],
              "Mrows_per_s": rows / r["median_s"] / 1e6, "speedup_vs_numpy": base / r["median_s"],
              "peak_rss_mb": r["peak_rss_mb"]} for p, r in results.items()]
    print_table(f"consistency, CPU ({machine()}), target >= 3x numpy", table,
                ["provider", "rows", "dim", "dtype", "median_s", "min_s", "Mrows_per_s", "speedup_vs_numpy",
                 "peak_rss_mb"])
    return table


def copy_bandwidth_gbs() -> float:
    """Measured device copy bandwidth (read + write) in GB/s, on a 4 GiB buffer."""
    import torch
    import triton.testing

    src = torch.empty(1 << 31, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), quantiles=[0.5])[0]
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def bench_cuda(rows: int, dim: int) -> list[dict]:
    import torch
    import torch.nn.functional as F
    import triton.testing

    from cfbd_fast import ops

    gen = torch.Generator(device="cuda").manual_seed(0)
    image, text, generated = (torch.randn(rows, dim, device="cuda", generator=gen, dtype=torch.float16)
                              for _ in range(3))

    def eager():
        i, t, g = (F.normalize(x, dim=1) for x in (image, text, generated))
        s_o, s_g = (i * t).sum(1).float().clamp_min(0), (i * g).sum(1).float().clamp_min(0)
        return (s_g - s_o).abs(), s_o, s_g

    copy_gbs = copy_bandwidth_gbs()
    bytes_moved = 3 * rows * dim * 2 + 3 * rows * 4  # three fp16 matrices read, three float32 vectors written
    table = []
    timings = {"cfbd_fast-triton": lambda: ops.consistency(image, text, generated), "torch-eager": eager}
    for provider, fn in timings.items():
        median, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        table.append({"provider": provider, "rows": rows, "dim": dim, "dtype": "fp16", "median_ms": median,
                      "p20_ms": p20, "p80_ms": p80, "GB_per_s": bytes_moved / (median * 1e-3) / 1e9})
    base = table[1]["median_ms"]
    for row in table:
        row["speedup_vs_eager"] = base / row["median_ms"]
        row["fraction_of_copy_bw"] = row["GB_per_s"] / copy_gbs
        row["copy_GB_per_s"] = copy_gbs
    print_table(f"consistency, CUDA ({machine()}), targets >= 2x eager and >= 0.7 of copy bandwidth", table,
                ["provider", "rows", "dim", "median_ms", "p20_ms", "p80_ms", "GB_per_s", "copy_GB_per_s",
                 "fraction_of_copy_bw", "speedup_vs_eager"])
    return table


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        provider, rows, dim, repeat = sys.argv[2:6]
        _child(provider, int(rows), int(dim), int(repeat))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rows", type=int, default=None, help="default 1,000,000 (cpu) or 3,000,000 (cuda)")
    parser.add_argument("--dim", type=int, default=None, help="default 512 (cpu) or 1024 (cuda)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per CPU provider (median reported)")
    args = parser.parse_args()
    if args.device == "cpu":
        table = bench_cpu(args.rows or 1_000_000, args.dim or 512, args.repeat)
    else:
        table = bench_cuda(args.rows or 3_000_000, args.dim or 1024)
    append_results("consistency", [{**row, "device": args.device} for row in table])


if __name__ == "__main__":
    main()
