"""End-to-end scan throughput: cfbd_fast.scan against a naive in-memory numpy + scikit-learn pipeline.

Both run the paper's algorithm (same mapper, top-q seeds, mean correlation) on the same store, each in a
fresh process that reports its own peak RSS. The mapper stage is also compared with the FLOP rate of a
plain large torch matmul measured in the same run.

    python benchmarks/bench_scan.py                      # 3,000,000 x 512 fp16 and 1,000,000 x 512 on the CPU
    python benchmarks/bench_scan.py --rows 1000000       # one size only
    python benchmarks/bench_scan.py --device cuda --dim 1024 --no-naive   # GPU: 3M x 1024 fp16
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results, child_peak_rss_mb, machine, print_table, run_child  # noqa: E402

HIDDEN = 1024
Q = 50


def mapper_flops_per_row(dim: int) -> float:
    return 2.0 * (dim * HIDDEN + HIDDEN * dim)


def prepare(data_dir: Path, rows: int, dim: int) -> tuple[Path, Path]:
    """A demo store of `rows` x `dim` fp16 (generated once, reused) and an untrained 2-layer MLP mapper."""
    from cfbd_fast.demo import DEMO_MODEL, write_demo_stores
    from cfbd_fast.mapper import MLPMapper, save_mapper
    from cfbd_fast.store import EmbeddingStore

    out = data_dir / f"scan-{rows}x{dim}"
    store_path = out / "scan.cfbd"
    try:
        ok = len(EmbeddingStore.open(store_path)) == rows
    except Exception:
        ok = False
    if not ok:
        shutil.rmtree(out, ignore_errors=True)
        write_demo_stores(out, rows=rows, dim=dim, reference_rows=1, progress=True)
        shutil.rmtree(out / "reference.cfbd")
    import torch

    torch.manual_seed(0)
    mapper = MLPMapper(dim, dim, depth=2, hidden=HIDDEN, model=DEMO_MODEL, pretrained="seed0", normalized=True)
    return store_path, save_mapper(mapper, out / "mapper.safetensors")


# -- the two pipelines, each run in a child process ----------------------------------------------------------
def child_ours(store: str, mapper: str, device: str) -> dict:
    """Two scans in one process: the first pays the numba JIT compile (reported as `cold_total`), the second
    is the steady state a long-running service or a second store sees."""
    import cfbd_fast

    t0 = time.perf_counter()
    cfbd_fast.scan(store, mapper, method="cfbd-paper", q=Q, device=device)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary = cfbd_fast.scan(store, mapper, method="cfbd-paper", q=Q, device=device).summary
    total = time.perf_counter() - t0
    t = summary["timings_s"]
    stages = {
        "load/read": t.get("open", 0) + t.get("read", 0),
        "mapper": t.get("mapper", 0) + t.get("mapper_fit", 0),
        "cosines": t.get("consistency", 0),
        "gmm": t.get("gmm", 0),
        "correlation": t.get("seeds", 0) + t.get("correlation", 0) + t.get("verdict", 0),
    }
    return {"stages": stages, "total": total, "cold_total": cold, "peak_rss_mb": child_peak_rss_mb()}


def child_naive(store: str, mapper: str) -> dict:
    """Load everything, then numpy + scikit-learn, as one would write it in a notebook."""
    import numpy as np
    import torch
    from sklearn.mixture import GaussianMixture

    from cfbd_fast.mapper import load_mapper
    from cfbd_fast.store import EmbeddingStore

    stages = {}
    t0 = time.perf_counter()
    st = EmbeddingStore.open(store)
    image = np.array(st.image)  # both matrices fully in memory
    text = np.array(st.text)
    stages["load/read"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = load_mapper(mapper)
    generated = np.empty_like(image)
    with torch.no_grad():
        for lo in range(0, len(image), 65536):
            batch = torch.from_numpy(image[lo:lo + 65536].astype(np.float32))
            generated[lo:lo + 65536] = model(batch).numpy().astype(np.float16)
    stages["mapper"] = time.perf_counter() - t0

    t0 = time.perf_counter()

    def unit(x):
        x = x.astype(np.float32)
        x /= np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]  # no (n, d) temporary for the norms
        return x

    # float32 copies one at a time, so that 3M x 512 fits in 24 GB (peak: two float32 matrices + fp16 ones)
    img = unit(image)
    del image
    txt = unit(text)
    s_o = np.maximum(np.einsum("ij,ij->i", img, txt), 0)
    del txt
    gen = unit(generated)
    del generated
    s_g = np.maximum(np.einsum("ij,ij->i", img, gen), 0)
    del gen, img
    c = np.abs(s_g - s_o)
    stages["cosines"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    gmm = GaussianMixture(n_components=5, covariance_type="full", tol=1e-3, random_state=0).fit(c[:, None])
    gmm.predict_proba(c[:, None])
    stages["gmm"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    seeds = np.argsort(-c, kind="stable")[:Q]
    txt = unit(text)
    z = txt @ txt[seeds].mean(axis=0)
    stages["correlation"] = time.perf_counter() - t0
    assert z.shape == c.shape
    return {"stages": stages, "total": sum(stages.values()), "peak_rss_mb": child_peak_rss_mb()}


def child_matmul(dim: int, device: str) -> dict:
    """FLOP rate of a plain large fp32 matmul of the mapper's shape, the ceiling for the mapper stage."""
    import torch

    a = torch.randn(65536, dim, device=device)
    w = torch.randn(dim, HIDDEN, device=device)
    a @ w
    reps = 10
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ w
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / reps
    return {"gflops": 2.0 * 65536 * dim * HIDDEN / seconds / 1e9, "peak_rss_mb": child_peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 3_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dir", type=Path, default=Path("bench-data"))
    ap.add_argument("--no-naive", action="store_true", help="skip the naive pipeline (it needs ~8 bytes/dim/row)")
    ap.add_argument("--keep", action="store_true", help="keep the generated stores")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        fn = {"ours": child_ours, "naive": child_naive, "matmul": child_matmul}[kind]
        rest = [int(r) if r.isdigit() else r for r in rest]
        print(json.dumps(fn(*rest)))
        return

    print(f"machine: {machine()}")
    matmul = run_child(__file__, "matmul", str(args.dim), args.device)
    print(f"plain torch matmul ({args.device}, 65536x{args.dim} @ {args.dim}x{HIDDEN} fp32): "
          f"{matmul['gflops']:.1f} GFLOP/s")
    records = []
    for rows in args.rows:
        store, mapper = prepare(args.dir, rows, args.dim)
        ours = run_child(__file__, "ours", str(store), str(mapper), args.device)
        naive = None
        if not args.no_naive:
            try:
                naive = run_child(__file__, "naive", str(store), str(mapper))
            except RuntimeError as exc:  # e.g. killed for memory: report ours anyway
                print(f"naive pipeline failed at {rows:,} rows: {exc}")
        table = []
        for stage in ours["stages"]:
            row = {"stage": stage, "ours_s": ours["stages"][stage]}
            if naive:
                row["naive_s"] = naive["stages"][stage]
                row["speedup"] = naive["stages"][stage] / max(ours["stages"][stage], 1e-9)
            table.append(row)
        non_mapper = {k: v for k, v in ours["stages"].items() if k != "mapper"}
        row = {"stage": "all but mapper", "ours_s": sum(non_mapper.values())}
        if naive:
            row["naive_s"] = sum(v for k, v in naive["stages"].items() if k != "mapper")
            row["speedup"] = row["naive_s"] / row["ours_s"]
        table.append(row)
        table.append({"stage": "total, first scan in a process (JIT compile)", "ours_s": ours["cold_total"]})
        row = {"stage": "total (wall)", "ours_s": ours["total"]}
        if naive:
            row.update(naive_s=naive["total"], speedup=naive["total"] / ours["total"])
        table.append(row)
        row = {"stage": "peak RSS MB", "ours_s": ours["peak_rss_mb"]}
        if naive:
            row.update(naive_s=naive["peak_rss_mb"], speedup=naive["peak_rss_mb"] / ours["peak_rss_mb"])
        table.append(row)
        mapper_gflops = rows * mapper_flops_per_row(args.dim) / max(ours["stages"]["mapper"], 1e-9) / 1e9
        print_table(f"scan of {rows:,} x {args.dim} fp16 on {args.device} (speedup = naive / ours; "
                    f"for peak RSS: naive / ours)", table,
                    ["stage", "ours_s", "naive_s", "speedup"] if naive else ["stage", "ours_s"])
        print(f"mapper stage: {mapper_gflops:.1f} GFLOP/s = {mapper_gflops / matmul['gflops']:.0%} of the plain "
              f"matmul's {matmul['gflops']:.1f} GFLOP/s")
        records.append({"rows": rows, "dim": args.dim, "device": args.device, "ours": ours, "naive": naive,
                        "matmul_gflops": matmul["gflops"], "mapper_gflops": mapper_gflops})
        if not args.keep:
            shutil.rmtree(store.parent, ignore_errors=True)
    append_results("bench_scan", records)


if __name__ == "__main__":
    main()
