"""Store benchmark: open time, and the read stage of a scan: iter_chunks against np.load(mmap_mode='r') streamed in
the same chunks, with `cat` as the disk's reference.

Writes a store of --gb GB (image + text, float16) and the same two matrices as .npy files under --dir. Each reader,
in a fresh process, goes through both matrices chunk by chunk and touches every byte of each chunk (a running
uint64 sum), as a scan's kernels would: for iter_chunks the time spent waiting in the iterator (its read-ahead
thread faulting pages in) is reported beside the total; for the memory map the page faults happen while the chunk
is touched, so only the total compares. Warm (page cache hot) and cold (files evicted with posix_fadvise(DONTNEED)
first); the readers alternate, --repeat rounds each, and the table gives medians and min-max. Usage:

    python benchmarks/bench_store.py [--dir bench-data] [--gb 4] [--dim 1024] [--chunk-rows 16384] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results, child_peak_rss_mb, machine, print_table, run_child, spread  # noqa: E402

WRITE_ROWS = 32768


def consume(array: np.ndarray) -> int:
    """Touch every byte: a wrapping uint64 sum over the raw row bytes."""
    return int(np.ascontiguousarray(array).view(np.uint64).sum())


def make_data(directory: Path, gb: float, dim: int) -> tuple[Path, list[Path]]:
    from cfbd_fast.store import EmbeddingStore

    rows = int(gb * 1e9 / (2 * dim * 2))
    store_path = directory / "bench.cfbd"
    npy_paths = [directory / "image.npy", directory / "text.npy"]
    if store_path.exists() and len(EmbeddingStore.open(store_path)) == rows and all(p.exists() for p in npy_paths):
        return store_path, npy_paths
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    block = np.random.default_rng(0).standard_normal((WRITE_ROWS, dim)).astype(np.float16)
    npys = [np.lib.format.open_memmap(p, mode="w+", dtype=np.float16, shape=(rows, dim)) for p in npy_paths]
    with EmbeddingStore.create(store_path, dim=dim, dtype="float16", model="synthetic") as store:
        for start in range(0, rows, WRITE_ROWS):
            n = min(WRITE_ROWS, rows - start)
            image, text = block[:n], block[::-1][:n]
            store.append(image=image, text=text)
            npys[0][start:start + n], npys[1][start:start + n] = image, text
    for array, path in zip(npys, npy_paths):
        array.flush()
        del array
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())
    return store_path, npy_paths


def evict(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: list[Path]) -> None:
    subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)


MMAP = "np.load(mmap_mode='r'), same chunks"


def child(method: str, store_path: str, npy_paths: list[str], chunk_rows: int) -> dict:
    from cfbd_fast.store import EmbeddingStore

    if method == "open":
        times = []
        for _ in range(20):
            start = time.perf_counter()
            store = EmbeddingStore.open(store_path)
            times.append(time.perf_counter() - start)
            store.close()
        return {"seconds": float(np.median(times)), "bytes": 0, "own_peak_rss_mb": child_peak_rss_mb()}
    start = time.perf_counter()
    total = nbytes = 0
    wait = 0.0
    if method == "iter_chunks":
        with EmbeddingStore.open(store_path) as store:
            chunks = store.iter_chunks(rows=chunk_rows, matrices=("image", "text"))
            while True:
                asked = time.perf_counter()
                chunk = next(chunks, None)
                wait += time.perf_counter() - asked
                if chunk is None:
                    break
                total += consume(chunk.image) + consume(chunk.text)
                nbytes += chunk.image.nbytes + chunk.text.nbytes
    elif method == MMAP:
        image, text = (np.load(path, mmap_mode="r") for path in npy_paths)
        for lo in range(0, image.shape[0], chunk_rows):
            total += consume(image[lo:lo + chunk_rows]) + consume(text[lo:lo + chunk_rows])
        nbytes = image.nbytes + text.nbytes
    else:
        raise SystemExit(f"unknown method {method}")
    result = {"seconds": time.perf_counter() - start, "bytes": nbytes, "checksum": total % (1 << 64),
              "own_peak_rss_mb": child_peak_rss_mb()}
    return {**result, "wait_s": wait} if method == "iter_chunks" else result


def timed_cat(paths: list[Path]) -> dict:
    start = time.perf_counter()
    subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)
    return {"seconds": time.perf_counter() - start, "bytes": sum(p.stat().st_size for p in paths)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("bench-data"), help="where to write the data (git-ignored)")
    parser.add_argument("--gb", type=float, default=4.0, help="store size in GB (image + text)")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--chunk-rows", type=int, default=16384, help="rows per chunk for both readers")
    parser.add_argument("--repeat", type=int, default=5, help="rounds per reader and cache state (at least 5)")
    parser.add_argument("--keep", action="store_true", help="keep the data for another run")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, store_path, chunk_rows, *npy_paths = args.child
        print(json.dumps(child(method, store_path, npy_paths, int(chunk_rows))))
        return
    if args.repeat < 5:
        parser.error("--repeat must be at least 5: medians of fewer rounds on a shared machine mean little")

    store_path, npy_paths = make_data(args.dir, args.gb, args.dim)
    store_files = [store_path / "image.emb", store_path / "text.emb"]
    script = Path(__file__).resolve()
    readers = {"cat FILES > /dev/null": store_files, "iter_chunks": store_files, MMAP: npy_paths}
    opened = run_child(script, "open", str(store_path), str(args.chunk_rows))
    rows = [{"method": "open (median of 20)", "cache": "warm", "median_s": opened["seconds"],
             "peak_rss_mb": opened["own_peak_rss_mb"]}]
    for cache in ("warm", "cold"):
        prepare = warm if cache == "warm" else evict
        runs = {name: [] for name in readers}
        for round_ in range(args.repeat):
            for name in list(readers)[round_ % 3:] + list(readers)[:round_ % 3]:
                prepare(readers[name])
                if name.startswith("cat"):
                    runs[name].append(timed_cat(readers[name]))
                else:
                    runs[name].append(run_child(script, name, str(store_path), str(args.chunk_rows),
                                                *map(str, npy_paths)))
        medians = {name: spread([r["seconds"] for r in results])["median_s"] for name, results in runs.items()}
        for name, results in runs.items():
            row = {"method": name, "cache": cache, **spread([r["seconds"] for r in results]),
                   "GB/s": results[0]["bytes"] / medians[name] / 1e9,
                   "vs cat": medians["cat FILES > /dev/null"] / medians[name],
                   "vs mmap": medians[MMAP] / medians[name]}
            if "wait_s" in results[0]:
                row["wait_s"] = float(np.median([r["wait_s"] for r in results]))
            if "own_peak_rss_mb" in results[0]:
                row["peak_rss_mb"] = max(r["own_peak_rss_mb"] for r in results)
            rows.append(row)

    size_gb = sum(p.stat().st_size for p in store_files) / 1e9
    print_table(f"Store read benchmark: {size_gb:.2f} GB store (2 x float16 x dim {args.dim}), chunks of "
                f"{args.chunk_rows} rows, {args.repeat} alternating rounds; speedups are medians' ratios; {machine()}",
                rows, ["method", "cache", "median_s", "range_s", "wait_s", "GB/s", "vs cat", "vs mmap",
                       "peak_rss_mb"])
    append_results("bench_store", [{**r, "size_gb": size_gb, "chunk_rows": args.chunk_rows} for r in rows])
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
