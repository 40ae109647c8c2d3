"""The scan on one GPU: stage times, achieved bytes/s against the copy bandwidth measured in the same run, Triton
against eager torch per kernel, and a new process's scan (cold) against a warm one.

For a 3,000,000 x 1024 fp16 demo store (the size of CC3M), an untrained 1024-1024-1024 MLP mapper (fp16 on CUDA)
and method cfbd-paper (both passes always run):

1. Bandwidth: a device-to-device copy (read + write bytes per second) and a pinned host-to-device copy (and a
   pageable one, for comparison), each the median of several timed copies of 1 GiB.
2. Stages (warm process): one scan with --timings (the device synchronised after every stage: true stage times)
   and the achieved bytes/s of each streaming stage against the bandwidth that bounds it; then the medians of
   scans without --timings (copies and kernels overlap: the figure a user sees).
3. Kernels: the Triton kernels against their eager torch references (`*_ref`) on --kernel-rows rows, and the
   GMM fit with its EM passes in torch on the device against the numba fit on the host.
4. Cold vs warm: `cfbd-fast scan` in new processes (wall time of the process and its own scan total) against
   the warm in-process scans. The first new process may also fill Triton's and numba's disk caches.

    python benchmarks/bench_gpu.py                                    # CUDA, 3,000,000 x 1024 fp16
    python benchmarks/bench_gpu.py --device cpu --rows 20000 --dim 128 --kernel-rows 20000 --no-record  # a check

Every table is appended to benchmarks/results.csv.
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results, machine, print_table  # noqa: E402
from bench_scan import demo_store, mapper_flops_per_row, speed_mapper  # noqa: E402

GIB = 1 << 30


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _median_seconds(fn, device: str, repeat: int = 10, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -- 1. bandwidth ----------------------------------------------------------------------------------------------------
def bandwidth(device: str, size: int = GIB) -> dict:
    """Bytes per second of a device-to-device copy (read + write) and of host-to-device copies."""
    import torch

    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    out = {"d2d_bytes_per_s": 2 * size / _median_seconds(lambda: dst.copy_(src), device)}
    if device == "cuda":
        pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        pageable = torch.empty(size, dtype=torch.uint8)
        out["h2d_pinned_bytes_per_s"] = size / _median_seconds(lambda: dst.copy_(pinned, non_blocking=True), device)
        out["h2d_pageable_bytes_per_s"] = size / _median_seconds(lambda: dst.copy_(pageable), device, repeat=5)
    return out


# -- 2. stages -------------------------------------------------------------------------------------------------------
def stage_table(summary: dict, rows: int, dim: int, bw: dict, device: str) -> list[dict]:
    """Per stage: seconds, the bytes it moves (streaming stages), achieved bytes/s and its share of the bound."""
    t = summary["timings_s"]
    itemsize = 2
    resident = summary["transfer"]["text_resident"]
    clusters = max(len(summary.get("clusters", [])), 1)
    host = bw.get("h2d_pinned_bytes_per_s")
    dev = bw["d2d_bytes_per_s"]
    moved = {
        "read": (2 * rows * dim * itemsize, host, "pinned H2D"),
        "consistency": (rows * dim * (itemsize * 2 + 4) + 3 * rows * 4, dev, "D2D"),
        "correlation": (clusters * rows * dim * itemsize, dev if resident or host is None else host,
                        "D2D" if resident or host is None else "pinned H2D"),
    }
    table = []
    for name, seconds in t.items():
        row = {"stage": name, "seconds": seconds}
        if name in moved and seconds > 0:
            nbytes, bound, label = moved[name]
            row.update(GB=nbytes / 1e9, GB_per_s=nbytes / seconds / 1e9)
            if bound:
                row.update(bound=f"{label} {bound / 1e9:.1f} GB/s", share=nbytes / seconds / bound)
        if name == "mapper" and seconds > 0:
            row["TFLOP_per_s"] = rows * mapper_flops_per_row(dim) / seconds / 1e12
        table.append(row)
    return table


def warm_scans(store: Path, mapper: Path, device: str, method: str, repeat: int) -> tuple[dict, list[dict], float]:
    """A first scan in this process, one with --timings, then `repeat` without: (timed summary, summaries, first)."""
    import cfbd_fast

    t0 = time.perf_counter()
    cfbd_fast.scan(store, str(mapper), device=device, method=method)
    first = time.perf_counter() - t0
    timed = cfbd_fast.scan(store, str(mapper), device=device, method=method, timings=True).summary
    plain = [cfbd_fast.scan(store, str(mapper), device=device, method=method).summary for _ in range(repeat)]
    return timed, plain, first


# -- 3. kernels ------------------------------------------------------------------------------------------------------
def kernel_table(device: str, rows: int, dim: int, bw: dict) -> list[dict]:
    """Each kernel the scan launches: ours (Triton on CUDA, the CPU path elsewhere) against its eager reference."""
    import numpy as np
    import torch

    from cfbd_fast.gmm import fit_gmm
    from cfbd_fast.gmm.device import fit_gmm_device
    cons, inv, seed = (importlib.import_module(f"cfbd_fast.ops.{name}")
                       for name in ("consistency", "invalid_rows", "seed_correlation"))

    impl = "triton" if device == "cuda" else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    image = torch.randn(rows, dim, device=device, generator=gen).half()
    text = torch.randn(rows, dim, device=device, generator=gen).half()
    generated = torch.randn(rows, dim, device=device, generator=gen)
    seeds = torch.randn(50, dim, device=device, generator=gen).half()
    cases = {
        "consistency": (lambda: getattr(cons, f"consistency_{impl}")(image, text, generated),
                        lambda: cons.consistency_ref(image, text, generated), rows * dim * 8 + 12 * rows),
        "seed_correlation mean q50": (lambda: getattr(seed, f"seed_correlation_{impl}")(text, seeds, "mean", None),
                                      lambda: seed.seed_correlation_ref(text, seeds, "mean", None),
                                      rows * dim * 2 + 4 * rows),
        "seed_correlation topk5 q50": (lambda: getattr(seed, f"seed_correlation_{impl}")(text, seeds, "topk", 5),
                                       lambda: seed.seed_correlation_ref(text, seeds, "topk", 5),
                                       rows * dim * 2 + 4 * rows),
        "invalid_rows": (lambda: getattr(inv, f"invalid_rows_{impl}")(text), lambda: inv.invalid_rows_ref(text),
                         rows * dim * 2 + rows),
    }
    table = []
    for name, (ours, eager, nbytes) in cases.items():
        t_ours, t_eager = _median_seconds(ours, device), _median_seconds(eager, device)
        table.append({"kernel": name, "ours": impl, "ours_s": t_ours, "eager_torch_s": t_eager,
                      "speedup": t_eager / t_ours, "ours_GB_per_s": nbytes / t_ours / 1e9,
                      "share_of_d2d": nbytes / t_ours / bw["d2d_bytes_per_s"]})
    scores = np.abs(np.random.default_rng(0).normal(0.05, 0.03, 3_000_000)).astype(np.float32)
    t_device = _median_seconds(lambda: fit_gmm_device(scores, k=5, device=device), device, repeat=3, warmup=1)
    t_host = _median_seconds(lambda: fit_gmm(scores, k=5), device, repeat=3, warmup=1)
    table.append({"kernel": "gmm fit, 3M scores, k=5", "ours": f"torch EM on {device}", "ours_s": t_device,
                  "eager_torch_s": t_host, "speedup": t_host / t_device, "ours_GB_per_s": None, "share_of_d2d": None})
    table[-1]["note"] = "the reference column is the numba fit on the host"
    return table


# -- 4. cold ---------------------------------------------------------------------------------------------------------
def cold_scans(store: Path, mapper: Path, device: str, method: str, out: Path, repeat: int) -> list[dict]:
    """`cfbd-fast scan` in new processes: process wall time and the scan's own total and stages."""
    runs = []
    for i in range(repeat):
        cmd = [sys.executable, "-c", "from cfbd_fast.cli.main import main; main()", "scan", str(store), "--mapper",
               str(mapper), "--device", device, "--method", method, "--out", str(out / f"cold-{i}"), "--force",
               "--quiet", "--json"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode:
            raise RuntimeError(f"cold scan failed: {done.stderr[-2000:]}")
        summary = json.loads(done.stdout)
        runs.append({"run": i + 1, "process_wall_s": wall, "scan_total_s": summary["timings_s"]["total"],
                     "outside_scan_s": wall - summary["timings_s"]["total"], "gmm_s": summary["timings_s"].get("gmm"),
                     "stages": summary["timings_s"]})
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--rows", type=int, default=3_000_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--kernel-rows", type=int, default=1_000_000,
                    help="rows of the per-kernel comparison (the eager references need several float32 copies)")
    ap.add_argument("--method", default="cfbd-paper",
                    help="scan method: cfbd-paper always runs both passes; cfbd's second pass runs only for the "
                         "caption clusters it finds (none with this untrained speed mapper)")
    ap.add_argument("--repeat", type=int, default=5, help="warm scans without --timings")
    ap.add_argument("--cold", type=int, default=3, help="scans in new processes")
    ap.add_argument("--dir", type=Path, default=Path("bench-data"))
    ap.add_argument("--no-record", action="store_true", help="print only; append nothing to results.csv")
    args = ap.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device here; run it on a GPU machine (make gpu-bench), or --device cpu to "
                 "check the script itself")
    name = torch.cuda.get_device_name() if args.device == "cuda" else machine()
    print(f"device: {name}; {args.rows:,} x {args.dim} fp16", flush=True)

    bw = bandwidth(args.device)
    print_table("copy bandwidth (median of timed 1 GiB copies)", [{"copy": k, "GB_per_s": v / 1e9}
                                                                    for k, v in bw.items()], ["copy", "GB_per_s"])
    store = demo_store(args.dir, args.rows, args.dim)
    mapper = speed_mapper(store.parent, args.dim)

    cold = cold_scans(store, mapper, args.device, args.method, store.parent, args.cold)
    timed, plain, first = warm_scans(store, mapper, args.device, args.method, args.repeat)
    stages = stage_table(timed, args.rows, args.dim, bw, args.device)
    resident = timed["transfer"]["text_resident"]
    print_table(f"stages of one warm scan with --timings (text resident on the device: {resident}; "
                f"method {timed['config']['method']}, mapper precision {timed['config']['mapper_precision']})",
                stages, ["stage", "seconds", "GB", "GB_per_s", "bound", "share", "TFLOP_per_s"])
    warm_totals = [s["timings_s"]["total"] for s in plain]
    totals = [{"scan": "cold: new process, wall", "seconds": statistics.median(r["process_wall_s"] for r in cold),
               "runs": " ".join(f"{r['process_wall_s']:.2f}" for r in cold)},
              {"scan": "cold: new process, scan total", "seconds": statistics.median(r["scan_total_s"] for r in cold),
               "runs": " ".join(f"{r['scan_total_s']:.2f}" for r in cold)},
              {"scan": "first scan in this process", "seconds": first, "runs": ""},
              {"scan": "warm, with --timings", "seconds": timed["timings_s"]["total"], "runs": ""},
              {"scan": "warm, no --timings (overlapped)", "seconds": statistics.median(warm_totals),
               "runs": " ".join(f"{t:.2f}" for t in warm_totals)}]
    print_table("cold vs warm totals (target: under 5 s for the cold scan)", totals, ["scan", "seconds", "runs"])
    print("cold process stages:", json.dumps(cold[0]["stages"]))
    kernels = kernel_table(args.device, args.kernel_rows, args.dim, bw)
    print_table(f"kernels on {args.kernel_rows:,} x {args.dim} fp16 (generated in fp32, as the mapper gives it): "
                "ours against eager torch", kernels,
                ["kernel", "ours", "ours_s", "eager_torch_s", "speedup", "ours_GB_per_s", "share_of_d2d"])
    if args.no_record:
        return
    meta = {"device_name": name, "rows": args.rows, "dim": args.dim}
    append_results("gpu", [{**meta, "bandwidth": bw}] + [{**meta, **row} for row in stages + totals + kernels]
                   + [{**meta, "cold": {k: v for k, v in r.items() if k != "stages"}} for r in cold])


if __name__ == "__main__":
    main()
