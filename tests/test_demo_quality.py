"""Detection quality on the default demo data (200k pairs, 512 dims, 0.1% poisoned), three seeds.

Acceptance bar of the scan: CFBD ranks every poison first (TPR at FPR 0.001 of 1) and its default,
error-controlled verdict (Benjamini-Hochberg at FDR 0.01) flags at least half of them at FPR <= 0.001, while
CLIP-score filtering (the `cosine` baseline) stays at TPR <= 0.6 at that FPR. (The defaults are chosen on real
images by benchmarks/bench_quality.py, not on this synthetic data: `--fdr 0.01`, chosen there for the genuine
target-class pairs that 0.05 lets through, flags 0.57-0.78 of the demo's poisons where 0.05 flags 0.89-0.96,
both without a false positive; `--reduce topk` misses a few percent of the demo's poisons whose template is far
from every seed, which `--reduce mean` catches.)
"""
import shutil

import pytest

from cfbd_fast.demo import train_demo_mapper, write_demo_stores
from cfbd_fast.mapper import save_mapper
from cfbd_fast.pipeline import scan


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cfbd_beats_cosine_on_default_demo(tmp_path, seed):
    scan_store, ref_store = write_demo_stores(tmp_path, seed=seed, progress=False)
    save_mapper(train_demo_mapper(ref_store, seed=seed), tmp_path / "mapper.safetensors")
    shutil.rmtree(ref_store)

    cfbd = scan(scan_store, tmp_path / "mapper.safetensors", seed=seed).summary["metrics"]
    assert cfbd["tpr_at_fpr_0.001"] >= 0.99, cfbd
    assert cfbd["tpr"] >= 0.5 and cfbd["fpr"] <= 0.001, cfbd

    cosine = scan(scan_store, method="cosine").summary["metrics"]
    assert cosine["tpr_at_fpr_0.001"] <= 0.6, cosine
