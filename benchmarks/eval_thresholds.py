"""Compare the threshold estimators of the fine stage on demo data with and without hard negatives.

Prints TPR / FPR per estimator and data set; the default in cfbd_fast.scan is chosen from this table
(docs/algorithm.md records the run). Usage: python benchmarks/eval_thresholds.py [--rows 200000] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results, print_table  # noqa: E402

from cfbd_fast.demo import DEMO_MAPPER_OPTIONS, write_demo_stores  # noqa: E402
from cfbd_fast.detect.threshold import ESTIMATORS  # noqa: E402
from cfbd_fast.mapper import save_mapper, train_mapper_on_store  # noqa: E402
from cfbd_fast.pipeline import scan  # noqa: E402
from cfbd_fast.store import EmbeddingStore  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    rows = []
    for hard_rate in (0.001, 0.0):
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                scan_store, ref_store = write_demo_stores(tmp, rows=args.rows, seed=seed,
                                                          hard_negative_rate=hard_rate, progress=False)
                with EmbeddingStore.open(ref_store) as ref:
                    save_mapper(train_mapper_on_store(ref, seed=seed, progress=False, **DEMO_MAPPER_OPTIONS), Path(tmp) / "m.safetensors")
                for score in ("z-so", "z"):
                    for est in ESTIMATORS:
                        s = scan(scan_store, Path(tmp) / "m.safetensors", seed=seed, score=score,
                                 threshold_method=est).summary
                        m = s["metrics"]
                        rows.append({"hard_negatives": hard_rate, "seed": seed, "score": score, "estimator": est,
                                     "threshold": s["threshold"]["value"], "tpr": m["tpr"], "fpr": m["fpr"],
                                     "precision": m["precision"], "auroc": m["auroc"],
                                     "tpr_at_fpr_0.001": m["tpr_at_fpr_0.001"]})
                        print(rows[-1], flush=True)
    print_table("threshold estimators on demo data", rows,
                ["hard_negatives", "seed", "score", "estimator", "threshold", "tpr", "fpr", "precision", "auroc",
                 "tpr_at_fpr_0.001"])
    append_results("eval_thresholds", rows)


if __name__ == "__main__":
    main()
