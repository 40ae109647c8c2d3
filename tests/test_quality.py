"""Detection quality on real images with the default options, on the small size (2,000 pairs) of each benchmark
domain (Twemoji and Openclipart: benchmarks/realdata.py, built by `make test` through `make realdata`), with its
full image tower: poisoned by `cfbd-fast poison`, embedded by `cfbd-fast embed` with the domain's real dual encoder,
scanned with either mapper (trained on the domain's clean mapper part, and `--mapper self`), and compared with the
simple baseline (benchmarks/baseline_simple.py) on the same stores."""
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_quality  # noqa: E402
import realdata  # noqa: E402
from quality_data import Cell, case_specs  # noqa: E402

from cfbd_fast import scan  # noqa: E402
from cfbd_fast.mapper import MLPMapper, save_mapper  # noqa: E402
from cfbd_fast.pipeline import V_POISONED  # noqa: E402
from cfbd_fast.store import EmbeddingStore  # noqa: E402

pytestmark = pytest.mark.slow
SIZE = 2000
POISON_SEED = 7
TRIGGER_CASES = [f"{attack}-1%" for attack in ("badnets", "blended", "sig", "wanet")]
CASES = case_specs(POISON_SEED)


@pytest.fixture(scope="module", params=realdata.DOMAINS)
def cell(request, tmp_path_factory):
    return Cell(request.param, "full", SIZE, tmp_path_factory.mktemp(f"quality-{request.param}")).build()


_RUNS: dict = {}


def run(cell, case: str, method: str, mapper: str = "-") -> dict:
    """bench_quality's metrics of one case, method and mapper on this cell (each run once per session)."""
    key = (cell.work, case, method, mapper)
    if key not in _RUNS:
        store = cell.case(case, CASES[case])
        path = {"trained": str(cell.mapper), "self": "self"}.get(mapper)
        _RUNS[key] = bench_quality.run_method(store, method, path, {})[0]
    return _RUNS[key]


# The cases the verdict does not yet meet at 2,000 pairs (benchmarks/RESULTS.md, "Detection quality across
# domains"), as measured at this poison seed: on Twemoji every poison of the one-caption attack is found, but
# genuine banana pairs whose captions do not describe their images pass the row cut too (above FPR 0.2%; 4 of
# 1,980, 0.202%, at bench_quality's poison seed 1); on Openclipart the one-caption attack with `--mapper self` (9
# of its 29 members undescribed against the data's 17%: p 0.042 at level 0.025, two clusters grounded; with the
# trained mapper one is, and it is found) and the second of two targets are not called.
# Strict: a case that starts to pass fails here until it leaves this list.
KNOWN_GAPS = {("twemoji", "one-caption", "trained"), ("twemoji", "one-caption", "self"),
              ("openclipart", "one-caption", "self"), ("openclipart", "two-targets", "self")}


def known_gap(request, *key: str) -> None:
    if key in KNOWN_GAPS:
        request.applymarker(pytest.mark.xfail(strict=True, reason="below TPR 0.95 or above FPR 0.2% at 2,000 pairs"))


@pytest.mark.parametrize("mapper", ["trained", "self"])
@pytest.mark.parametrize("case", TRIGGER_CASES + ["one-caption"])
def test_each_attack_is_found_with_the_defaults(cell, case, mapper, request):
    known_gap(request, cell.domain, case, mapper)
    m = run(cell, case, "cfbd", mapper)
    assert m["tpr"] >= 0.95 and m["fpr"] <= 0.002, (cell.name, case, mapper, m)


@pytest.mark.parametrize("mapper", ["trained", "self"])
@pytest.mark.parametrize("case", ["clean", "image-group"])
def test_clean_data_and_a_boilerplate_group_flag_almost_nothing(cell, case, mapper):
    m = run(cell, case, "cfbd", mapper)
    assert m["fpr"] <= 0.001, (cell.name, case, mapper, m)


@pytest.mark.parametrize("mapper", ["trained", "self"])
@pytest.mark.parametrize("case", TRIGGER_CASES + ["one-caption", "clean", "image-group"])
def test_cfbd_catches_at_least_what_simple_catches(cell, case, mapper):
    ours, simple = run(cell, case, "cfbd", mapper), run(cell, case, "simple")
    assert ours["true_positives"] >= simple["true_positives"], (cell.name, case, mapper, ours, simple)
    assert ours["fp"] <= max(simple["fp"], int(0.002 * SIZE)), (cell.name, case, mapper, ours, simple)


def test_two_targets_are_two_clusters(cell, request):
    known_gap(request, cell.domain, "two-targets", "self")
    store = cell.case("two-targets", CASES["two-targets"])
    result = scan(store, "self")
    found = [c for c in result.summary["clusters"] if c["backdoor"]]
    assert len(found) == 2, result.summary["clusters"]
    assert {("banana" in c["caption"], "pizza" in c["caption"]) for c in found} == {(True, False), (False, True)}
    assert result.summary["metrics"]["tpr"] >= 0.9, result.summary["metrics"]


def test_genuine_one_caption_groups_are_not_flagged(cell):
    """The scan part holds boilerplate groups of 10-40 different icons under one stock caption."""
    labels = realdata.read_labels(cell.clean_csv.parent)
    group_rows = np.array([i for i, row in enumerate(labels) if row["kind"] == "boilerplate"])
    assert len(group_rows) >= 40
    result = scan(cell.clean_store, "self")
    assert not (result.verdict[group_rows] == V_POISONED).any()


def test_weak_evidence_is_said(cell, tmp_path):
    """A mapper that explains nothing, and invalid rows, are reported in the summary and on stderr."""
    store = EmbeddingStore.open(cell.clean_store)
    useless = MLPMapper(store.dim, store.dim, depth=1)  # untrained: F(I) is a random projection
    result = scan(cell.clean_store, save_mapper(useless, tmp_path / "useless.safetensors"))
    assert any("explains almost nothing" in w for w in result.summary["warnings"])
    image = np.array(store.image)
    image[:3] = np.nan
    bad = EmbeddingStore.from_arrays(tmp_path / "bad.cfbd", image=image, text=np.array(store.text),
                                     meta=store.meta.drop_columns(["row_id"]), model=store.model,
                                     pretrained=store.pretrained, normalized=True)
    result = scan(bad, "self")
    assert any("3 rows with NaN/inf" in w for w in result.summary["warnings"])


def test_poison_embed_scan_through_the_command_line(tmp_path):
    """A user's path from images to a verdict: `cfbd-fast poison`, `embed`, `scan`, as subprocesses."""
    import csv
    import json
    import subprocess

    data = realdata.ensure_all(progress=False)
    part = Path(data["parts"]["scan"])
    with open(part, newline="") as fh:
        rows = list(csv.reader(fh))
    subset = tmp_path / "subset.csv"  # 2,000 real rows, image paths made absolute
    with open(subset, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(rows[0])
        for image, caption in rows[1:2001]:
            writer.writerow([str(part.parent / image), caption])

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "cfbd_fast.cli.main", *map(str, args), "--quiet", "--json"],
                             capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stderr + out.stdout
        return json.loads(out.stdout)

    poisoned = cli("poison", subset, "--attack", "sig", "--rate", 0.02, "--seed", 3, "--out", tmp_path / "poisoned")
    assert poisoned["poisoned"] == 40
    embedded = cli("embed", tmp_path / "poisoned", "--model", f"local-dir:{data['model']}", "--out",
                   tmp_path / "p.cfbd")
    assert embedded["rows_written"] == 2000 and embedded["skipped"] == 0
    summary = cli("scan", tmp_path / "p.cfbd", "--mapper", "self", "--out", tmp_path / "p.scan")
    assert summary["metrics"]["positives"] == 40 and summary["metrics"]["auroc"] >= 0.95, summary["metrics"]
    assert summary["metrics"]["fpr"] <= 0.005, summary["metrics"]
    assert (tmp_path / "p.scan" / "flagged.csv").exists()
