"""Shared by the benchmark scripts: machine description, isolated child runs with peak RSS, tables, results.csv."""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

RESULTS_CSV = Path(__file__).with_name("results.csv")


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
