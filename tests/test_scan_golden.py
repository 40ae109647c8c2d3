"""The scan's per-row outputs on a small demo store equal those recorded before the pipeline became array stages."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from cfbd_fast import scan

GOLDEN = Path(__file__).parent / "data" / "scan_golden"
sys.path.insert(0, str(GOLDEN))
import record  # noqa: E402  (the recording script: its store options and cases)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path, _ = record.make_inputs(tmp_path_factory.mktemp("golden"))
    return path


@pytest.fixture(scope="module")
def recorded():
    return np.load(GOLDEN / "outputs.npz"), json.loads((GOLDEN / "summary.json").read_text())["cases"]


CASES = {**{k: (None, v) for k, v in record.CASES.items()},
         **{k: (m, record.CASES["cfbd"]) for k, m in record.MAPPER_CASES.items()}}


@pytest.mark.parametrize("case", list(CASES))
def test_scan_outputs_unchanged(store, recorded, case):
    arrays, summaries = recorded
    mapper, options = CASES[case]
    result = scan(store, mapper or str(GOLDEN / "mapper.safetensors"), **options)
    assert result.summary["seeds"]["rows"] == summaries[case]["seeds"]
    # a self-fitted mapper trains anew here: its float sums may round differently with another thread count
    tol = 2e-4 if case == "cfbd-self" else 1e-5
    for field in record.FIELDS:
        got, want = np.asarray(getattr(result, field)), arrays[f"{case}/{field}"]
        if got.dtype.kind == "f":
            np.testing.assert_allclose(got, want, atol=tol, rtol=0, equal_nan=True, err_msg=f"{case}: {field}")
        else:
            np.testing.assert_array_equal(got, want, err_msg=f"{case}: {field}")
