"""`cfbd-fast filter` on webdataset shards: rows/s and MB/s of writing the cleaned copy, against `cp` of the same
shards followed by `sync` of the copies (the filter fsyncs each shard it publishes) as the disk's reference.

Writes --shards .tar shards of --rows-per-shard samples (a --kb KB image, a caption and a .json each) under --dir
and a scan verdict that drops 1% of the keys; each round runs `cfbd-fast filter` in a fresh process (wall time,
start-up included) and `cp` + `sync` of the shards, alternating, page cache warm (the shards were just written or read).
Medians of --repeat rounds. Usage:

    python benchmarks/bench_filter.py [--dir bench-data/filter] [--shards 8] [--rows-per-shard 10000] [--kb 8]
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results, machine, print_table, spread  # noqa: E402


def make_shards(folder: Path, shards: int, rows: int, kb: int) -> list[str]:
    folder.mkdir(parents=True)
    payload = np.random.default_rng(0).bytes(kb * 1024)
    keys = []
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(rows):
                key = f"{shard:05d}{i:05d}"
                keys.append(key)
                for suffix, data in (("jpg", payload), ("txt", f"a caption of {key}".encode()),
                                     ("json", json.dumps({"key": key}).encode())):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return keys


def write_verdict(scan: Path, keys: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    scan.mkdir(parents=True)
    verdict = ["poisoned" if i % 100 == 0 else "benign" for i in range(len(keys))]
    pq.write_table(pa.table({"row_id": np.arange(len(keys)), "key": keys,
                             "verdict": pa.array(verdict).dictionary_encode()}), scan / "scores.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("bench-data/filter"))
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--rows-per-shard", type=int, default=10000)
    parser.add_argument("--kb", type=int, default=8, help="image bytes per sample, in KB")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    shutil.rmtree(args.dir, ignore_errors=True)
    keys = make_shards(args.dir / "shards", args.shards, args.rows_per_shard, args.kb)
    write_verdict(args.dir / "scan", keys)
    size_mb = sum(p.stat().st_size for p in (args.dir / "shards").iterdir()) / 1e6
    times = {"cfbd-fast filter": [], "cp + sync (reference)": []}
    for _ in range(args.repeat):
        for name in times:
            out = args.dir / "out"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            if name.startswith("cp"):  # the filter fsyncs every shard it publishes; so does the reference
                subprocess.run(["cp", "-r", str(args.dir / "shards"), str(out)], check=True)
                subprocess.run(["sync", *map(str, sorted(out.iterdir()))], check=True)
            else:
                subprocess.run([sys.executable, "-m", "cfbd_fast.cli.main", "filter", str(args.dir / "scan"),
                                str(args.dir / "shards"), "--out", str(out), "--quiet"], check=True,
                               stdout=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - start)
    rows = []
    for name, values in times.items():
        stats = spread(values)
        rows.append({"method": name, **stats, "rows/s": len(keys) / stats["median_s"],
                     "MB/s": size_mb / stats["median_s"]})
    print_table(f"filter: {args.shards} webdataset shards, {len(keys):,} samples ({size_mb:,.0f} MB, {args.kb} KB "
                f"images), 1% dropped; process wall time, medians of {args.repeat}; {machine()}", rows,
                ["method", "median_s", "range_s", "rows/s", "MB/s"])
    append_results("bench_filter", [{**r, "samples": len(keys), "size_mb": size_mb} for r in rows])
    shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
