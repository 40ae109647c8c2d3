"""Records the scan's per-row outputs on a small demo store, for the test that keeps them unchanged.

Run from the repository root: `python tests/data/scan_golden/record.py [CASE ...]` (the named cases only, after
an intended change of their behaviour; the others keep their recorded outputs). The store is regenerated from the
demo generator (deterministic for its seed); the mapper's weights are saved beside the outputs so that the
comparison does not depend on how a mapper trains on another machine.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
STORE_OPTIONS = {"rows": 6000, "dim": 128, "poison_rate": 0.01, "seed": 3, "reference_rows": 4000}
# Every option given explicitly, so that later changes of defaults do not move the recorded outputs.
CASES = {
    "cfbd": {"method": "cfbd", "seed_select": "dense", "score": "z-so", "threshold_method": "gap"},
    "cfbd-top": {"method": "cfbd", "seed_select": "top", "score": "z-so", "threshold_method": "gap"},
    "cfbd-robust-z": {"method": "cfbd", "seed_select": "dense", "score": "z-so", "threshold_method": "robust-z"},
    "cfbd-paper": {"method": "cfbd-paper", "seed_select": "top", "score": "z", "threshold_method": "gap"},
    "coarse": {"method": "coarse"},
    "cosine": {"method": "cosine"},
    "safeclip": {"method": "safeclip"},
}
MAPPER_CASES = {"cfbd-self": "self", "cfbd-knn": "knn"}
FIELDS = ("s_o", "s_g", "c", "posterior", "subset", "z", "score", "verdict")


def make_inputs(out: Path) -> tuple[Path, Path]:
    """The demo store under `out` and the recorded mapper file."""
    from cfbd_fast.demo import write_demo_stores

    store, _ = write_demo_stores(out, progress=False, **STORE_OPTIONS)
    return store, HERE / "mapper.safetensors"


def main() -> None:
    from cfbd_fast import scan
    from cfbd_fast.demo import train_demo_mapper
    from cfbd_fast.mapper import save_mapper

    with tempfile.TemporaryDirectory() as tmp:
        store, mapper_path = make_inputs(Path(tmp))
        if not mapper_path.exists():
            save_mapper(train_demo_mapper(Path(tmp) / "reference.cfbd", seed=0), mapper_path)
        arrays, summaries = {}, {}
        if (HERE / "outputs.npz").exists():
            arrays = dict(np.load(HERE / "outputs.npz"))
            summaries = json.loads((HERE / "summary.json").read_text())["cases"]
        cases = {**{k: (mapper_path, v) for k, v in CASES.items()},
                 **{k: (v, CASES["cfbd"]) for k, v in MAPPER_CASES.items()}}
        only = set(sys.argv[1:]) or set(cases)
        for name, (mapper, options) in cases.items():
            if name not in only:
                continue
            result = scan(store, str(mapper), **options)
            for field in FIELDS:
                arrays[f"{name}/{field}"] = np.asarray(getattr(result, field))
            summaries[name] = {"seeds": result.summary["seeds"]["rows"],
                               "poisoned": int((result.verdict == 1).sum())}
        np.savez_compressed(HERE / "outputs.npz", **arrays)
        (HERE / "summary.json").write_text(json.dumps({"store": STORE_OPTIONS, "cases": summaries}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
