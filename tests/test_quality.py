"""Detection quality on real images with the default options: the Twemoji benchmark (benchmarks/realdata.py, built
by `make test` through `make realdata`), poisoned by `cfbd-fast poison`, embedded by `cfbd-fast embed` with its
real dual encoder, scanned by `cfbd-fast scan --mapper self` (the mapper that did best on this benchmark, see
benchmarks/RESULTS.md) and otherwise default options."""
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_quality  # noqa: E402
import realdata  # noqa: E402

from cfbd_fast import scan  # noqa: E402
from cfbd_fast.mapper import MLPMapper, save_mapper  # noqa: E402
from cfbd_fast.pipeline import V_POISONED  # noqa: E402
from cfbd_fast.store import EmbeddingStore  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    data = realdata.ensure_all(progress=False)
    work = tmp_path_factory.mktemp("quality")
    model = Path(data["model"])
    clean_csv = Path(data["parts"]["scan"])
    clean = bench_quality.embed_csv(clean_csv, work / "clean.cfbd", model)

    def case(name, **poison):
        return bench_quality.case_store(name, clean_csv, clean, model, work, **poison)
    return {"clean": clean, "mapper": "self", "case": case, "work": work, "labels": data["parts"]["scan"]}


def _truth(store):
    return np.asarray(EmbeddingStore.open(store).meta.column("is_poisoned").to_numpy(zero_copy_only=False))


@pytest.mark.parametrize("attack", ["badnets", "blended", "sig", "wanet"])
def test_each_attack_is_found_with_the_defaults(bench, attack):
    store = bench["case"](f"{attack}-1pct", attack=attack, rate=0.01, seed=7)
    m = scan(store, bench["mapper"]).summary["metrics"]
    assert m["tpr"] >= 0.95 and m["fpr"] <= 0.002, m


def test_clean_data_flags_almost_nothing(bench):
    result = scan(bench["clean"], bench["mapper"])
    assert (result.verdict == V_POISONED).mean() <= 0.001, result.summary["clusters"]


def test_two_targets_are_two_clusters(bench):
    store = bench["case"]("two-targets", attack="multi-trigger", targets=["banana", "pizza"],
                          multi_attacks=["badnets", "blended"], rate=0.01, seed=7)
    result = scan(store, bench["mapper"])
    found = [c for c in result.summary["clusters"] if c["backdoor"]]
    assert len(found) == 2, result.summary["clusters"]
    assert {("banana" in c["caption"], "pizza" in c["caption"]) for c in found} == {(True, False), (False, True)}
    assert result.summary["metrics"]["tpr"] >= 0.9, result.summary["metrics"]


def test_genuine_one_caption_groups_are_not_flagged(bench):
    """The scan part holds 20 groups of 10-40 different emoji under one stock caption ("free icon download")."""
    labels = realdata.read_labels(Path(bench["labels"]).parent)
    group_rows = np.array([i for i, row in enumerate(labels) if row["kind"] == "boilerplate"])
    assert len(group_rows) >= 200
    result = scan(bench["clean"], bench["mapper"])
    assert not (result.verdict[group_rows] == V_POISONED).any()
    aside = [c for c in result.summary["clusters_set_aside"] if "one caption string" in c["reason"]]
    assert aside and all(c["one_caption_share"] >= 0.5 for c in aside)


def test_weak_evidence_is_said(bench, tmp_path):
    """A mapper that explains nothing, and invalid rows, are reported in the summary and on stderr."""
    store = EmbeddingStore.open(bench["clean"])
    useless = MLPMapper(store.dim, store.dim, depth=1)  # untrained: F(I) is a random projection
    result = scan(bench["clean"], save_mapper(useless, tmp_path / "useless.safetensors"))
    assert any("explains almost nothing" in w for w in result.summary["warnings"])
    image = np.array(store.image)
    image[:3] = np.nan
    bad = EmbeddingStore.from_arrays(tmp_path / "bad.cfbd", image=image, text=np.array(store.text),
                                     meta=store.meta.drop_columns(["row_id"]), model=store.model,
                                     pretrained=store.pretrained, normalized=True)
    result = scan(bad, bench["mapper"])
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

    def run(*args):
        out = subprocess.run([sys.executable, "-m", "cfbd_fast.cli.main", *map(str, args), "--quiet", "--json"],
                             capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stderr + out.stdout
        return json.loads(out.stdout)

    poisoned = run("poison", subset, "--attack", "sig", "--rate", 0.02, "--seed", 3, "--out", tmp_path / "poisoned")
    assert poisoned["poisoned"] == 40
    embedded = run("embed", tmp_path / "poisoned", "--model", f"local-dir:{data['model']}", "--out",
                   tmp_path / "p.cfbd")
    assert embedded["rows_written"] == 2000 and embedded["skipped"] == 0
    summary = run("scan", tmp_path / "p.cfbd", "--mapper", "self", "--out", tmp_path / "p.scan")
    assert summary["metrics"]["positives"] == 40 and summary["metrics"]["auroc"] >= 0.95, summary["metrics"]
    assert summary["metrics"]["fpr"] <= 0.005, summary["metrics"]
    assert (tmp_path / "p.scan" / "flagged.csv").exists()
