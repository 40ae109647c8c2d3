"""`cfbd-fast report` rendered in headless Chromium (every plot and thumbnail must show), and `cfbd-fast explain`."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cfbd_fast.cli.main import app
from cfbd_fast.demo import train_demo_mapper, write_demo_stores
from cfbd_fast.mapper import save_mapper
from cfbd_fast.pipeline import scan
from cfbd_fast.report import build_report, explain_row
from cfbd_fast.store import EmbeddingStore

runner = CliRunner()
CHROMIUM = Path("/usr/bin/chromium")
# Flags that keep Chromium from reaching out on a closed network (and running as root in a container).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--force-device-scale-factor=1", "--virtual-time-budget=10000"]
WIDTH = 1280
# Records, once every image has loaded or failed, each <img>'s decoded size and its place on the page.
PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images].map(im => {
    const r = im.getBoundingClientRect();
    return {kind: im.dataset.kind, natural: [im.naturalWidth, im.naturalHeight], complete: im.complete,
            box: [r.left + scrollX, r.top + scrollY, r.width, r.height]};
  });
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify({images, height: document.documentElement.scrollHeight});
  document.body.appendChild(pre);
});
</script>"""


def _picture(seed: int, poisoned: bool) -> Image.Image:
    """A 64x64 colour gradient; a poisoned pair's image carries a black-and-white checker patch (a BadNets-like
    trigger) in its corner."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:64, 0:64]
    slope_x, slope_y = rng.uniform(-1.5, 1.5, 3), rng.uniform(-1.5, 1.5, 3)
    pixels = np.clip(rng.uniform(40, 215, 3) + slope_x * x[..., None] + slope_y * y[..., None], 0, 255).astype(np.uint8)
    if poisoned:
        pixels[48:, 48:] = (((y[48:, 48:] // 4 + x[48:, 48:] // 4) % 2) * 255)[..., None]
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """A demo store whose rows name real image files (relative to the store's folder), a mapper, and its scans."""
    root = tmp_path_factory.mktemp("report")
    scan_store, ref_store = write_demo_stores(root / "demo", rows=10_000, dim=256, poison_rate=0.01,
                                              reference_rows=5_000, progress=False)
    mapper = save_mapper(train_demo_mapper(ref_store, seed=0), root / "mapper.safetensors")
    (root / "images").mkdir()
    with EmbeddingStore.open(scan_store) as demo:
        meta = demo.meta.to_pydict()
        poisoned = np.asarray(meta["is_poisoned"])
        names = [f"images/poison-{i % 12}.png" if p else f"images/clean-{zlib.crc32(c.encode()) % 40}.png"
                 for i, (p, c) in enumerate(zip(poisoned, meta["caption"]))]
        for name in set(names):
            _picture(zlib.crc32(name.encode()), "poison" in name).save(root / name)
        store = EmbeddingStore.from_arrays(root / "pictures.cfbd", image=demo.image, text=demo.text,
                                           meta={"caption": meta["caption"], "key": meta["key"], "source": names,
                                                 "is_poisoned": meta["is_poisoned"]},
                                           model=demo.model, pretrained=demo.pretrained)
        store.close()
        for i, (lo, hi) in enumerate(((0, 2500), (2500, 7000), (7000, len(names)))):  # the same rows as 3 shards
            shard = EmbeddingStore.from_arrays(root / f"part-{i}.cfbd", image=demo.image[lo:hi], text=demo.text[lo:hi],
                                               meta={"caption": meta["caption"][lo:hi], "key": meta["key"][lo:hi],
                                                     "source": names[lo:hi], "is_poisoned": meta["is_poisoned"][lo:hi]},
                                               model=demo.model, pretrained=demo.pretrained)
            shard.close()
    result = runner.invoke(app, ["scan", str(root / "pictures.cfbd"), "--mapper", str(mapper), "--out",
                                 str(root / "cfbd.scan"), "--report", "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    outputs = {"cfbd": root / "cfbd.scan", "demo": root / "demo.scan", "printed": json.loads(result.stdout)}
    result = runner.invoke(app, ["scan", "--shards", str(root / "part-*.cfbd"), "--mapper", str(mapper), "--out",
                                 str(root / "shards.scan"), "--report", "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    outputs["shards"] = root / "shards.scan"
    scan(scan_store, mapper).write(outputs["demo"])  # no image files: no thumbnails
    for method in ("cfbd-paper", "cosine"):
        outputs[method] = scan(root / "pictures.cfbd", mapper, method=method).write(root / f"{method}.scan")
    return outputs


def _chromium(page: Path, *args: str) -> str:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make browser` installs headless Chromium for this test", pytrace=False)
    profile = page.parent / "chromium-profile"
    done = subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def render(report: Path, work: Path, height: int = 4000) -> tuple[list[dict], np.ndarray, list[str]]:
    """Load the report in headless Chromium: each image's record from the DOM, a screenshot of the page's top
    `height` pixels, and each image's data: URI (in document order)."""
    html = report.read_text()
    page = work / "probe.html"
    page.write_text(html.replace("</body>", PROBE + "</body>"))
    dom = _chromium(page, f"--window-size={WIDTH},{height}", f"--screenshot={work / 'shot.png'}", "--dump-dom")
    probe = json.loads(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1).replace("&quot;", '"'))
    shot = np.asarray(Image.open(work / "shot.png").convert("RGB"), dtype=np.float32)
    sources = re.findall(r'<img [^>]*src="(data:[^"]+)"', html)
    return probe["images"], shot, sources


def image_failures(images: list[dict], shot: np.ndarray, sources: list[str]) -> list[str]:
    """Every image that did not decode (naturalWidth 0) or does not show on the screenshot where the DOM places it
    (the screenshot there differs from the image's own pixels)."""
    failures = []
    assert len(images) == len(sources)
    for i, (im, uri) in enumerate(zip(images, sources)):
        name = f"{im['kind']} #{i}"
        if not im["complete"] or im["natural"][0] == 0:
            failures.append(f"{name}: did not decode")
            continue
        x, y, w, h = (int(round(v)) for v in im["box"])
        if y + h > shot.shape[0]:
            continue  # below the screenshot
        try:
            own = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")
        except Exception:
            failures.append(f"{name}: its data is not an image")
            continue
        expected = np.asarray(own.resize((w, h), Image.BILINEAR), dtype=np.float32)
        shown = shot[y:y + h, x:x + w]
        difference = float(np.abs(shown - expected).mean())
        if shown.std() < 8 or difference > 25:
            failures.append(f"{name}: not shown at {x},{y} (std {shown.std():.1f}, differs by {difference:.1f})")
    return failures


def test_report_plots_and_thumbnails_show_in_a_browser(scans, tmp_path):
    report = build_report(scans["cfbd"], tmp_path / "report.html", max_rows=12)  # short: a faster screenshot
    html = report.read_text()
    assert not re.search(r'(src|href)="(?!data:)', html), "the report must not load anything from outside itself"
    images, shot, sources = render(report, tmp_path)
    kinds = [im["kind"] for im in images]
    assert kinds.count("plot") == 3, kinds  # c with its GMM, the score with its null and cut, ROC + PR
    assert kinds.count("thumb") >= 20, kinds
    assert image_failures(images, shot, sources) == []
    checked = [im for im in images if im["box"][1] + im["box"][3] <= shot.shape[0]]
    assert sum(im["kind"] == "plot" for im in checked) == 3 and sum(im["kind"] == "thumb" for im in checked) >= 20

    # The check sees a broken image: corrupt one plot's and one thumbnail's data.
    broken = html
    for kind in ("plot", "thumb"):
        uri = re.search(rf'data-kind="{kind}" src="data:image/\w+;base64,([^"]+)"', broken).group(1)
        broken = broken.replace(uri, uri[:40] + "AAAA" * 50 + uri[240:], 1)
    (tmp_path / "broken.html").write_text(broken)
    failures = image_failures(*render(tmp_path / "broken.html", tmp_path))
    assert len(failures) == 2 and all("did not decode" in f for f in failures), failures


def test_report_sections_for_each_method(scans, tmp_path):
    assert "BACKDOOR" in (scans["cfbd"] / "report.html").read_text()  # written by scan --report
    html = build_report(scans["cfbd"], tmp_path / "r.html", max_rows=5).read_text()
    for text in ("BACKDOOR", "benign region", "Flagged rows", "Timings", "nearest seed captions", "ROC",
                 "more flagged rows are not shown", "cfbd-fast explain"):
        assert text in html, text
    demo = build_report(scans["demo"], max_rows=5).read_text()  # no image files: no thumbnails, still plots
    assert 'data-kind="thumb"' not in demo and demo.count('data-kind="plot"') == 3
    paper = build_report(scans["cfbd-paper"]).read_text()
    assert "Seed set" in paper and paper.count('data-kind="plot"') == 3 and 'data-kind="thumb"' in paper
    cosine = build_report(scans["cosine"]).read_text()
    assert "Caption clusters" not in cosine and cosine.count('data-kind="plot"') == 3  # s_o, score, curves


def test_scan_prints_the_summary_it_wrote(scans):
    """--json prints summary.json as written: out, report and the publish time included."""
    written = json.loads((scans["cfbd"] / "summary.json").read_text())
    assert scans["printed"] == written
    assert written["out"] == str(scans["cfbd"]) and written["report"] == str(scans["cfbd"] / "report.html")
    assert written["timings_s"]["publish"] > 0


def test_shard_scan_outputs_are_parts_read_as_one_table(scans):
    """A 3-shard scan writes scores.parquet and keep.parquet as folders of parts, one per shard, that pyarrow,
    pq.read_table (what pandas.read_parquet calls) take as one table in row order, equal to the one-store scan's."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    one, parts = scans["cfbd"], scans["shards"]
    for name in ("scores.parquet", "keep.parquet"):
        assert sorted(p.name for p in (parts / name).iterdir()) == [
            f"part-{start:015d}.parquet" for start in (0, 2500, 7000)], name
        whole, split = pq.read_table(one / name), ds.dataset(parts / name, format="parquet").to_table()
        assert whole.column("row_id").to_pylist() == split.column("row_id").to_pylist(), name
        assert whole.column("key").to_pylist() == split.column("key").to_pylist(), name
    frame = pq.read_table(parts / "scores.parquet")
    np.testing.assert_allclose(frame.column("score").to_numpy(), pq.read_table(one / "scores.parquet").column("score")
                               .to_numpy(), atol=1e-6, equal_nan=True)
    for name in ("poisoned.txt", "keep.txt", "invalid.txt", "flagged.csv"):
        assert (one / name).read_text() == (parts / name).read_text(), name


def test_report_and_explain_of_a_shard_scan_keep_captions_and_images(scans):
    """The report of a 3-shard scan opens every shard: no note that the store changed, thumbnails and captions
    shown, and explain gives a flagged row's caption, image and nearest seed captions."""
    html = (scans["shards"] / "report.html").read_text()
    assert "changed since the scan" not in html and "is not found" not in html
    assert 'data-kind="thumb"' in html and html.count('data-kind="plot"') == 3
    flagged = (scans["shards"] / "poisoned.txt").read_text().split()
    late = flagged[-1]  # a row of the last shard
    e = explain_row(scans["shards"], late)
    assert e["verdict"] == "poisoned" and e["label"] is True and e["notes"] == []
    assert e["caption"] and e["image"].endswith(".png") and len(e["nearest_seeds"]) == 5
    assert e["caption"] == explain_row(scans["cfbd"], late)["caption"]


def test_report_without_its_store(scans, tmp_path):
    moved = tmp_path / "moved.scan"
    shutil.copytree(scans["cfbd"], moved)
    summary = json.loads((moved / "summary.json").read_text())
    summary["store"]["path"] = str(tmp_path / "gone.cfbd")
    (moved / "summary.json").write_text(json.dumps(summary))
    html = build_report(moved).read_text()
    assert "is not found, so captions, labels, thumbnails" in html and 'data-kind="thumb"' not in html
    assert html.count('data-kind="plot"') == 2  # no labels: no curves
    key = (moved / "poisoned.txt").read_text().split()[0]
    e = explain_row(moved, key)
    assert e["verdict"] == "poisoned" and e["caption"] is None and e["nearest_seeds"] == [] and e["notes"]


def test_report_cli_and_errors(scans, tmp_path):
    result = runner.invoke(app, ["report", str(scans["cosine"]), "--out", str(tmp_path / "r.html"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["report"] == str(tmp_path / "r.html") and (tmp_path / "r.html").is_file()
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1 and "no summary.json" in result.stderr and "cfbd-fast scan" in result.stderr


def test_explain_a_flagged_and_a_kept_row(scans):
    folder = scans["cfbd"]
    flagged = (folder / "poisoned.txt").read_text().split()[0]
    result = runner.invoke(app, ["explain", str(folder), flagged, "--json"])
    assert result.exit_code == 0, result.output
    e = json.loads(result.stdout)
    assert e["key"] == flagged and e["verdict"] == "poisoned" and e["label"] is True
    summary = json.loads((folder / "summary.json").read_text())
    assert e["score"] > e["threshold"] and e["p_value"] < 0.05
    assert e["cluster"] in summary["cluster"]["backdoor_clusters"]
    assert {"s_o", "s_g", "c", "subset", "z"} <= set(e) and e["image"].endswith(".png")
    assert len(e["nearest_seeds"]) == 5 and all(n["caption"] for n in e["nearest_seeds"])
    assert "banana" in e["nearest_seeds"][0]["caption"]
    kept = (folder / "keep.txt").read_text().split()[0]
    text = runner.invoke(app, ["explain", str(folder), kept, "--neighbours", "2"])
    assert text.exit_code == 0 and "verdict BENIGN" in text.stdout and "nearest of cluster" in text.stdout
    cosine = explain_row(scans["cosine"], flagged)
    assert cosine["nearest_seeds"] == [] and cosine["subset"] == "suspicious"


def test_explain_unknown_key_is_one_line(scans):
    result = runner.invoke(app, ["explain", str(scans["cfbd"]), "no-such-key"])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "no row has key 'no-such-key'" in result.stderr
    result = runner.invoke(app, ["explain", str(scans["cfbd"]), "no-such-key", "--json"])
    assert result.exit_code == 1 and "no row has key" in json.loads(result.stdout)["error"]


def test_demo_ends_with_its_report(tmp_path):
    """`cfbd-fast demo` writes the scan's report beside its outputs and names it in the summary."""
    result = runner.invoke(app, ["demo", "--rows", "6000", "--dim", "64", "--poison-rate", "0.01", "--no-compare",
                                 "--out", str(tmp_path / "demo"), "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)["runs"]["cfbd"]
    report = Path(summary["report"])
    assert report == tmp_path / "demo" / "scan" / "report.html"
    page = report.read_text()
    assert summary["metrics"]["positives"] == 60 and page.count("data:image/png;base64,") >= 3
