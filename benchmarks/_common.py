"""Shared by the benchmark scripts: machine description, isolated child runs with peak RSS, interleaved timing with
median and min-max, tables, results.csv."""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

RESULTS_CSV = Path(__file__).with_name("results.csv")
BASELINE = "torch-chunked"  # the kernel benchmarks' primary baseline: chunked F.normalize + row-wise dots


def machine() -> str:
    """One line naming the machine: CPU model, core count, RAM, GPU if any."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", {torch.cuda.get_device_name(0)}"
    except Exception:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB{gpu}"


def run_child(script: str | Path, *args: str, env: dict | None = None) -> dict:
    """Run `python script --child args...` in a fresh process; return its JSON result plus `peak_rss_mb`.

    The child must print one JSON object on its last stdout line and should include its own
    `peak_rss_mb` from child_peak_rss_mb(). Otherwise the value from wait4() is used, which on Linux
    also counts the parent's resident set at the time of the fork: an upper bound only.
    """
    proc = subprocess.Popen([sys.executable, str(script), "--child", *args], stdout=subprocess.PIPE,
                            env={**os.environ, **(env or {})}, text=True)
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} --child {' '.join(args)} failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result.setdefault("peak_rss_mb", rusage.ru_maxrss / 1024)
    return result


def child_peak_rss_mb() -> float:
    """Peak RSS of the current process since its exec (VmHWM), for a child to report itself."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def reset_peak_rss() -> float:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0); returns that RSS in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return current_rss_mb()


def interleaved(providers: dict[str, Callable[[], object]], repeat: int, device: str = "cpu") -> dict[str, dict]:
    """Time every provider `repeat` times in interleaved rounds, after one untimed warm-up call each.

    The order rotates each round, so a change in the machine's load falls on every provider alike. Returns, per
    provider, its times and `extra_mb`: the most memory one call used above what the process held before it
    (CPU: peak RSS, reset before each call; CUDA: peak allocated device memory).
    """
    sync = lambda: None  # noqa: E731
    if device == "cuda":
        import torch

        sync = torch.cuda.synchronize
    names = list(providers)
    for name in names:
        providers[name]()
    sync()
    out = {name: {"times": [], "extra_mb": 0.0} for name in names}
    for round_ in range(repeat):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            before = _reset_peak_memory(device)
            start = time.perf_counter()
            providers[name]()
            sync()
            out[name]["times"].append(time.perf_counter() - start)
            out[name]["extra_mb"] = max(out[name]["extra_mb"], _peak_memory(device) - before)
    return out


def _reset_peak_memory(device: str) -> float:
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    return reset_peak_rss()


def _peak_memory(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return child_peak_rss_mb()


def spread(times: list[float]) -> dict:
    """Median, min and max of a list of seconds, plus a printable `min-max` range."""
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "range_s": f"{min(times):.4g}-{max(times):.4g}", "runs": len(times)}


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    """A plain aligned text table (also valid Markdown) on stdout."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")


def append_results(bench: str, rows: list[dict]) -> None:
    """Append each row to benchmarks/results.csv with date, machine and versions."""
    import numpy

    versions = {"numpy": numpy.__version__}
    for mod in ("torch", "triton", "numba", "sklearn"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            pass
    from cfbd_fast import __version__

    new = not RESULTS_CSV.exists()
    with RESULTS_CSV.open("a", newline="") as fh:
        writer = csv.writer(fh)
        if new:
            writer.writerow(["date", "bench", "machine", "cfbd_fast", "versions", "measurement"])
        stamp = _dt.datetime.now().isoformat(timespec="seconds")
        for row in rows:
            writer.writerow([stamp, bench, machine(), __version__, json.dumps(versions), json.dumps(row)])


# -- kernel benchmarks (bench_consistency, bench_seed_correlation) ----------------------------------------------------
def set_threads(threads: int | None) -> int:
    """Set torch's (and numba's) thread count for every provider: `threads`, or the project's rule (the cores that
    other processes leave idle, from the load average). Printed, and returned for results.csv."""
    from cfbd_fast.threads import configure_threads

    threads = configure_threads(threads)
    print(f"threads: {threads} (of {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f})")
    return threads


def make_inputs(rows: int, dim: int, matrices: int, seed: int = 0) -> list:
    """`matrices` (rows, dim) float16 numpy arrays of standard normal values, generated in blocks."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(matrices):
        x = np.empty((rows, dim), dtype=np.float16)
        for start in range(0, rows, 1 << 16):
            x[start:start + (1 << 16)] = rng.standard_normal((min(1 << 16, rows - start), dim), dtype=np.float32)
        out.append(x)
    return out


def copy_bandwidth_gbs() -> float:
    """Measured device copy bandwidth (read + write) in GB/s, on a 4 GiB buffer."""
    import torch
    import triton.testing

    src = torch.empty(1 << 31, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), quantiles=[0.5])[0]
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def check_agreement(ours, theirs, rows: int = 10_000) -> None:
    """The providers compute the same thing: outputs agree to fp16-input precision on the first rows."""
    import numpy as np

    for a, b in zip(ours, theirs):
        a, b = (np.asarray(x[:rows].cpu() if hasattr(x, "cpu") else x[:rows], dtype=np.float64) for x in (a, b))
        assert np.nanmax(np.abs(a - b)) < 1e-3, "providers disagree: the benchmark compares different things"


def report(op: str, device: str, rows: int, dim: int, repeat: int, measured: dict, bytes_moved: int,
           target: float | None, **fields) -> list[dict]:
    """Print the table of one measurement (speedups against the fastest torch baseline) and return its rows."""
    stats = {name: spread(result["times"]) for name, result in measured.items()}
    baseline = min((name for name in stats if name.startswith(BASELINE)), key=lambda name: stats[name]["median_s"])
    copy_gbs = copy_bandwidth_gbs() if device == "cuda" else None
    table = []
    for name, result in measured.items():
        row = {"provider": name, **fields, "device": device, "rows": rows, "dim": dim, "dtype": "fp16",
               **stats[name], "extra_mb": result["extra_mb"], "baseline": baseline,
               "speedup": stats[baseline]["median_s"] / stats[name]["median_s"],
               "GB_per_s": bytes_moved / stats[name]["median_s"] / 1e9}
        if copy_gbs:
            row["fraction_of_copy_bw"] = row["GB_per_s"] / copy_gbs
        table.append(row)
    goal = f"; target >= {target:g}x" if target else ("; target >= 0.7 of copy bandwidth" if copy_gbs else "")
    import torch

    print_table(f"{op}, {device} ({machine()}), {rows:,} x {dim} fp16, {repeat} interleaved rounds, "
                f"{torch.get_num_threads()} threads; speedup = {baseline} / provider{goal}", table,
                ["provider", *fields, "median_s", "range_s", "speedup", "GB_per_s", "extra_mb"]
                + (["fraction_of_copy_bw"] if copy_gbs else []))
    return table
