"""Detection quality on real images: `cfbd-fast poison` attacks on the Twemoji benchmark, embedded with its real
dual encoder, scanned by every method; defaults are tuned on some poison seeds and reported on the others.

Cases: each attack (badnets, blended, sig, wanet) at each poison rate and seed, a clean copy, two targets at once
(multi-trigger) and paraphrased target captions (badclip-style natural captions). Mappers: one trained on the
held-apart clean `mapper` part, and `--mapper self`. Methods: cfbd, cfbd-paper, coarse, cosine, safeclip and a
local-density detector on image embeddings (mean distance to the 16 nearest neighbours).

Only the poisoned rows' new images are embedded per case; every other row keeps the clean store's vectors
(the embedding of an image does not depend on its batch).
Usage: python benchmarks/bench_quality.py [--small] [--tune-seeds 0 1] [--report-seeds 2 3] [--rates ...]
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cfbd_fast.errors import InputError  # noqa: E402

ATTACKS = ("badnets", "blended", "sig", "wanet")
RATES = (0.001, 0.003, 0.01, 0.03)
METHODS = ("cfbd", "cfbd-paper", "coarse", "cosine", "safeclip", "density")
MAPPERS = ("trained", "self")
SECOND_TARGET = "pizza"
COLUMNS = ("case", "mapper", "method", "tp", "fp", "tpr", "fpr", "precision", "auroc", "auprc", "tpr@0.001",
           "seed_prec", "clusters", "time_s")


def embed_csv(csv_path: Path, out: Path, model_dir: Path) -> Path:
    from cfbd_fast.embed.runner import embed

    embed(csv_path, out, f"local-dir:{model_dir}", workers=0, progress=False)  # resumes, or finds it complete
    return out


def train_reference_mapper(store: Path, out: Path) -> Path:
    from cfbd_fast.mapper import save_mapper, train_mapper
    from cfbd_fast.pipeline.source import ChunkSource

    if not out.exists():
        ref = ChunkSource(store)
        mapper = train_mapper(ref.store.image, ref.store.text, rows=ref.valid_rows(), depth=1, batch_size=256,
                              lr=3e-3, epochs=20, seed=0, **ref.embedding_model)
        save_mapper(mapper, out)
    return out


def case_store(name: str, clean_csv: Path, clean_store: Path, model_dir: Path, work: Path, **poison) -> Path:
    """The clean store with the rows `poison_dataset` changed replaced by their new embeddings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cfbd_fast.poison import poison_dataset
    from cfbd_fast.store import EmbeddingStore

    out = work / f"{name}.cfbd"
    if (out / "store.json").exists():
        return out
    pdir = work / f"{name}.poison"
    if not (pdir / "data.csv").exists():
        poison_dataset(clean_csv, pdir, clean_images="reference", progress=False, force=True, **poison)
    record = pq.read_table(pdir / "poison_record.parquet").to_pydict()
    rows = np.asarray(record["row"], dtype=np.int64)
    with open(pdir / "data.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    changed = work / f"{name}.changed.csv"
    with open(changed, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        for r in rows:
            writer.writerow([str((pdir / table[r]["image"]).resolve()), table[r]["caption"]])
    new = EmbeddingStore.open(embed_csv(changed, work / f"{name}.changed.cfbd", model_dir))
    base = EmbeddingStore.open(clean_store)
    image, text = np.array(base.image), np.array(base.text)
    image[rows], text[rows] = new.image, new.text
    meta = base.meta.to_pydict()
    truth = np.zeros(len(base), dtype=bool)
    truth[rows] = True
    meta["caption"] = [row["caption"] for row in table]
    if "source" in meta:  # the changed rows' images are the poisoned copies (thumbnails in `cfbd-fast report`)
        for r in rows:
            meta["source"][r] = str((pdir / table[r]["image"]).resolve())
    meta["is_poisoned"] = truth.tolist()
    EmbeddingStore.from_arrays(out, image=image, text=text, meta=pa.table(meta), model=base.model,
                               pretrained=base.pretrained, normalized=True).close()
    return out


def density_scores(store: Path, k: int = 16) -> np.ndarray:
    """Mean cosine distance of each image to its k nearest fellow images (the local-density baseline)."""
    import torch

    from cfbd_fast.store import EmbeddingStore

    x = torch.from_numpy(np.asarray(EmbeddingStore.open(store).image, dtype=np.float32))
    x = torch.nn.functional.normalize(x, dim=1)
    out = np.empty(len(x), dtype=np.float32)
    for start in range(0, len(x), 2048):
        sim = x[start:start + 2048] @ x.T
        sim[torch.arange(sim.shape[0]), torch.arange(start, start + sim.shape[0])] = -2.0
        out[start:start + 2048] = (1.0 - sim.topk(k, dim=1).values.mean(dim=1)).numpy()
    return out


def evaluate(store: Path, mapper: str, method: str, options: dict) -> dict:
    from cfbd_fast import scan
    from cfbd_fast.detect.metrics import detection_metrics
    from cfbd_fast.store import EmbeddingStore

    started = time.perf_counter()
    if method == "density":
        truth = np.asarray(EmbeddingStore.open(store).meta.column("is_poisoned").to_numpy(zero_copy_only=False))
        score = density_scores(store)
        cut = np.quantile(score, 0.99)  # as its authors use it: a ranking, flagged at the data's top 1%
        m = detection_metrics(truth, score > cut, score)
        m["clusters"] = ""
    else:
        result = scan(store, mapper if method not in ("cosine", "safeclip") else None, method=method, **options)
        m = result.summary["metrics"]
        clusters = result.summary.get("clusters", [])
        m["clusters"] = f"{sum(c['backdoor'] for c in clusters)}/{len(clusters)}" if clusters else ""
        m["warnings"] = result.summary.get("warnings", [])
    m["time_s"] = time.perf_counter() - started
    return m


def row(case: str, mapper: str, method: str, m: dict) -> dict:
    return {"case": case, "mapper": mapper, "method": method, "tp": m["true_positives"], "fp": m["false_positives"],
            "tpr": m["tpr"], "fpr": m["fpr"], "precision": m["precision"], "auroc": m["auroc"], "auprc": m["auprc"],
            "tpr@0.001": m["tpr_at_fpr_0.001"], "seed_prec": m.get("seed_precision", float("nan")),
            "clusters": m.get("clusters", ""), "time_s": m["time_s"]}


def fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.3f}"
    return str(value)


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n## {title}\n")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in rows:
        print("| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |")


def cases(seeds, rates, attacks) -> list[tuple[str, dict]]:
    out = [("clean", None)]
    for seed in seeds:
        for attack in attacks:
            for rate in rates:
                out.append((f"{attack}-{rate:g}-s{seed}", {"attack": attack, "rate": rate, "seed": seed}))
        out.append((f"two-targets-s{seed}", {"attack": "multi-trigger", "targets": ["banana", SECOND_TARGET],
                                            "multi_attacks": ["badnets", "blended"], "rate": 0.01, "seed": seed}))
        out.append((f"paraphrased-s{seed}", {"attack": "badclip-style", "rate": 0.01, "seed": seed}))
    return out


def main(argv=None) -> None:
    import realdata

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="the test-size data (.cache/realdata-small)")
    ap.add_argument("--work", type=Path, default=ROOT / "bench-data" / "quality")
    ap.add_argument("--tune-seeds", type=int, nargs="*", default=[0, 1])
    ap.add_argument("--report-seeds", type=int, nargs="*", default=[2, 3])
    ap.add_argument("--rates", type=float, nargs="*", default=list(RATES))
    ap.add_argument("--attacks", nargs="*", default=list(ATTACKS))
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--mappers", nargs="*", default=list(MAPPERS))
    ap.add_argument("--option", action="append", default=[], help="scan option as NAME=JSON, e.g. fdr=0.01")
    ap.add_argument("--csv", type=Path, default=None, help="also write the rows to this CSV")
    args = ap.parse_args(argv)
    options = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.option)}

    from cfbd_fast.threads import configure_threads

    configure_threads()
    data = realdata.ensure_all(small=args.small, progress=False)
    work = args.work / ("small" if args.small else "full")
    work.mkdir(parents=True, exist_ok=True)
    model_dir = Path(data["model"])
    clean_csv = Path(data["parts"]["scan"])
    clean_store = embed_csv(clean_csv, work / "clean.cfbd", model_dir)
    mapper_store = embed_csv(Path(data["parts"]["mapper"]), work / "mapper.cfbd", model_dir)
    mappers = {"trained": str(train_reference_mapper(mapper_store, work / "mapper.safetensors")), "self": "self"}
    print(f"# bench_quality: {'small' if args.small else 'full'} real-image data, model local-dir:{model_dir.name}, "
          f"tower test R@1 {data['retrieval']['r1']:.3f}; options {options or 'defaults'}")
    for split, seeds in (("tune", args.tune_seeds), ("report", args.report_seeds)):
        rows = []
        for name, poison in cases(seeds, args.rates, args.attacks):
            if name == "clean" and split == "report":
                continue
            try:
                store = clean_store if poison is None else case_store(name, clean_csv, clean_store, model_dir, work,
                                                                      **poison)
            except InputError as exc:
                print(f"skipped {name}: {exc}")
                continue
            for method in args.methods:
                for mapper in (args.mappers if method in ("cfbd", "cfbd-paper", "coarse") else ["-"]):
                    if name == "clean":  # no positives: count false positives only
                        m = evaluate_clean(store, mappers.get(mapper), method, options)
                    else:
                        m = evaluate(store, mappers.get(mapper), method, options)
                    rows.append(row(name, mapper, method, m))
                    print(json.dumps({k: fmt(v) for k, v in rows[-1].items()}), flush=True)
        print_table(rows, f"{split} seeds {seeds}")
        if args.csv:
            with open(args.csv.with_name(f"{args.csv.stem}-{split}{args.csv.suffix}"), "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=COLUMNS)
                writer.writeheader()
                writer.writerows(rows)


def evaluate_clean(store: Path, mapper, method: str, options: dict) -> dict:
    """On the clean copy every flagged row is a false positive; ranking metrics do not exist."""
    from cfbd_fast import scan

    started = time.perf_counter()
    if method == "density":
        flagged = 0
    else:
        result = scan(store, mapper if method not in ("cosine", "safeclip") else None, method=method, labels=None,
                      **options)
        flagged = int((result.verdict == 1).sum())
        clusters = result.summary.get("clusters", [])
    nan = float("nan")
    return {"true_positives": 0, "false_positives": flagged, "tpr": nan, "fpr": flagged / len(result.verdict)
            if method != "density" else nan, "precision": nan, "auroc": nan, "auprc": nan, "tpr_at_fpr_0.001": nan,
            "clusters": (f"{sum(c['backdoor'] for c in clusters)}/{len(clusters)}" if method != "density" and clusters
                         else ""), "time_s": time.perf_counter() - started}


if __name__ == "__main__":
    main()
