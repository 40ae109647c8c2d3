"""Store benchmark: open time, and full-read throughput and peak RSS of iter_chunks vs np.load, np.load(mmap) and cat.

Writes a store of --gb GB (image + text, float16) and the same two matrices as .npy files under --dir, then reads
everything once per method in a fresh process, warm (page cache hot) and cold (files evicted with
posix_fadvise(DONTNEED) first). Each reader touches every byte (a running uint64 sum). Usage:

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
from _common import append_results, machine, print_table, run_child  # noqa: E402

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


def child(method: str, store_path: str, npy_paths: list[str], chunk_rows: int) -> dict:
    from cfbd_fast.store import EmbeddingStore

    if method == "open":
        times = []
        for _ in range(20):
            start = time.perf_counter()
            store = EmbeddingStore.open(store_path)
            times.append(time.perf_counter() - start)
            store.close()
        return {"seconds": float(np.median(times)), "bytes": 0, "own_peak_rss_mb": own_peak_rss_mb()}
    start = time.perf_counter()
    total = 0
    nbytes = 0
    if method == "iter_chunks":
        with EmbeddingStore.open(store_path) as store:
            for chunk in store.iter_chunks(rows=chunk_rows):
                total += consume(chunk.image) + consume(chunk.text)
                nbytes += chunk.image.nbytes + chunk.text.nbytes
    elif method == "np.load":
        for path in npy_paths:
            array = np.load(path)
            total += consume(array)
            nbytes += array.nbytes
            del array
    elif method == "np.load(mmap_mode='r')":
        for path in npy_paths:
            array = np.load(path, mmap_mode="r")
            for row in range(0, array.shape[0], chunk_rows):
                total += consume(array[row:row + chunk_rows])
            nbytes += array.nbytes
            del array
    else:
        raise SystemExit(f"unknown method {method}")
    return {"seconds": time.perf_counter() - start, "bytes": nbytes, "checksum": total % (1 << 64),
            "own_peak_rss_mb": own_peak_rss_mb()}


def own_peak_rss_mb() -> float:
    """This process's own high-water RSS (VmHWM). Unlike ru_maxrss it does not inherit the parent's peak across
    fork + exec, so a small reader started by a big parent reports its own footprint."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def timed_cat(paths: list[Path]) -> dict:
    start = time.perf_counter()
    subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)
    return {"seconds": time.perf_counter() - start, "bytes": sum(p.stat().st_size for p in paths)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("bench-data"), help="where to write the data (git-ignored)")
    parser.add_argument("--gb", type=float, default=4.0, help="store size in GB (image + text)")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--chunk-rows", type=int, default=16384, help="rows per chunk for the streaming readers")
    parser.add_argument("--keep", action="store_true", help="keep the data for another run")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, store_path, chunk_rows, *npy_paths = args.child
        print(json.dumps(child(method, store_path, npy_paths, int(chunk_rows))))
        return

    store_path, npy_paths = make_data(args.dir, args.gb, args.dim)
    store_files = [store_path / "image.emb", store_path / "text.emb"]
    script = Path(__file__).resolve()
    rows = []

    def record(method: str, cache: str, result: dict, baseline: dict | None) -> None:
        row = {"method": method, "cache": cache, "seconds": result["seconds"],
               "peak_rss_mb": result.get("own_peak_rss_mb", "")}
        if result["bytes"]:
            row["GB/s"] = result["bytes"] / result["seconds"] / 1e9
            row["vs cat"] = row["GB/s"] / baseline["GB/s"]
        rows.append(row)

    opened = run_child(script, "open", str(store_path), str(args.chunk_rows))
    record("open (median of 20)", "warm", opened, None)
    for cache in ("warm", "cold"):
        prepare = warm if cache == "warm" else evict
        prepare(store_files)
        cat = timed_cat(store_files)
        cat_row = {"GB/s": cat["bytes"] / cat["seconds"] / 1e9}
        record("cat FILES > /dev/null", cache, cat, cat_row)
        for method in ("iter_chunks", "np.load", "np.load(mmap_mode='r')"):
            files = store_files if method == "iter_chunks" else npy_paths
            prepare(files)
            result = run_child(script, method, str(store_path), str(args.chunk_rows), *map(str, npy_paths))
            record(method, cache, result, cat_row)

    size_gb = sum(p.stat().st_size for p in store_files) / 1e9
    print_table(f"Store read benchmark: {size_gb:.2f} GB store (2 x float16 x dim {args.dim}), "
                f"chunks of {args.chunk_rows} rows; {machine()}", rows,
                ["method", "cache", "seconds", "GB/s", "vs cat", "peak_rss_mb"])
    append_results("bench_store", [{**r, "size_gb": size_gb, "chunk_rows": args.chunk_rows} for r in rows])
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
