"""Defense effect on real images, the paper's end point: the benchmark's image tower retrained from scratch
(LiT-style, against the frozen MiniLM text tower) on a poisoned copy of the `scan` part, on the rows CFBD keeps and on
the rows the cosine baseline keeps; attack success rate and clean retrieval on the held-out `test` part.

Per attack, at one poison rate and poison seed: the case of bench_quality.py (same poisoned rows and store, cached
in its work folder), scanned by `cfbd` (the default method, with the reference mapper trained on the clean `mapper`
part) and by `cosine` with their default options. Arms, each trained from the same initialisation and schedule:
  poisoned   every row of the poisoned copy
  cfbd       the rows CFBD calls benign
  cosine     the rows the cosine baseline calls benign (at its default FPR it may flag none: then this arm is the
             poisoned one, measured once)
  cosine-matched  the cosine baseline at CFBD's budget: as many rows removed as CFBD removed, lowest cosine first
  clean      the clean `scan` part (no attack), once per training seed: the floor
Measured on `test` (one image per emoji, "a photo of a {name}."): clean R@1 / R@5 image -> caption over its distinct
captions, and ASR: the share of triggered test images (the attack's trigger, same poison seed; the target's own
image left out) whose top caption among those captions (the target's, "a photo of a banana.", is one) is the target's.
Usage: python benchmarks/bench_defense.py [--attacks ...] [--rate 0.03] [--epochs 6] [--train-seeds 0] [--csv PATH]
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

ATTACKS = ("badnets", "blended", "sig", "wanet")
ARMS = ("poisoned", "cfbd", "cosine", "cosine-matched")
TARGET_CAPTION = "a photo of a banana."  # the test part's caption of the attack target
COLUMNS = ("attack", "arm", "train_seed", "rows", "poison_rows", "removed", "removed_poison", "asr", "r1", "r5",
           "train_s")


# -- measurement --------------------------------------------------------------------------------------------------
def recall_at(similarity, truth, ks=(1, 5)) -> dict:
    """R@k of image -> caption retrieval: the share of images (rows of `similarity`) whose true caption `truth[i]`
    is among the k best scored (ties in its favour)."""
    import torch

    from realdata_tower import caption_ranks

    ranks = caption_ranks(torch.as_tensor(similarity), torch.as_tensor(truth))
    return {k: float((ranks < k).float().mean()) for k in ks}


def attack_success_rate(similarity, target: int) -> float:
    """The share of (triggered) images, rows of `similarity`, whose best scored caption is `target` (ties in its
    favour): the attack succeeded on them."""
    import torch

    return recall_at(similarity, torch.full((len(similarity),), int(target)), ks=(1,))[1]


# -- data -----------------------------------------------------------------------------------------------------------
def read_csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def triggered_images(test_dir: Path, work: Path, attack: str, seed: int, preprocess):
    """The attack's trigger on every test image except the target's own (`cfbd-fast poison --image-only` with the
    poisoning run's seed, so seed-drawn trigger parts such as WaNet's grid are the same), preprocessed; and the
    rows of `test` they belong to."""
    from cfbd_fast.poison import poison_dataset
    from realdata_tower import load_images

    out = work / f"test-{attack}-s{seed}.trigger"
    if not (out / "data.csv").exists():
        poison_dataset(test_dir / "data.csv", out, attack, image_only=True, seed=seed, clean_images="reference",
                       progress=False, force=True)
    rows = read_csv_rows(out / "data.csv")
    keep = [k for k, row in enumerate(rows) if row["caption"] != TARGET_CAPTION]
    return load_images(out, preprocess, [rows[k]["image"] for k in keep]), keep


class Material:
    """Everything the arms share: the clean images of the part attacked (`scan`), the test part (clean, captions,
    truth) and the frozen text embeddings of every caption met, each computed once."""

    def __init__(self, cache: Path, spec, part: str = "scan", progress: bool = False):
        import torch

        from realdata import read_labels
        from realdata_tower import encode_captions, load_images, new_model

        self.cache, self.spec, self.progress = Path(cache), spec, progress
        model, self.tokenizer, self.preprocess = new_model(spec, 0)
        self.text_model = model
        self.scan_rows = read_csv_rows(self.cache / part / "data.csv")
        self.scan_images = load_images(self.cache / part, self.preprocess, [r["image"] for r in self.scan_rows])
        test = read_labels(self.cache / "test")
        self.test_captions = sorted({row["caption"] for row in test})
        if TARGET_CAPTION not in self.test_captions:
            raise ValueError(f"the test part has no caption {TARGET_CAPTION!r}")
        self.target = self.test_captions.index(TARGET_CAPTION)
        self.test_truth = torch.tensor([self.test_captions.index(row["caption"]) for row in test])
        self.test_images = load_images(self.cache / "test", self.preprocess, [row["image"] for row in test])
        self.test_text = encode_captions(model, self.tokenizer, self.test_captions)
        self._text: dict[str, object] = {}

    def text(self, captions: list[str]):
        """Frozen text embeddings of `captions` (rows in that order), encoding only captions not met before."""
        import torch

        from realdata_tower import encode_captions

        new = sorted(set(captions) - self._text.keys())
        if new:
            self._text.update(zip(new, encode_captions(self.text_model, self.tokenizer, new)))
        return torch.stack([self._text[c] for c in captions])


def train_and_measure(material: Material, images, captions: list[str], triggered: dict, seed: int) -> dict:
    """Train a fresh image tower (seed `seed`) on `images` with `captions` (softmax over their distinct captions,
    as the benchmark's tower is trained), then measure clean R@1/R@5 and ASR on every triggered test set given."""
    import torch

    from realdata_tower import encode_images, fit_image_tower, new_model

    started = time.perf_counter()
    model, _, _ = new_model(material.spec, seed)
    bank_captions = sorted(set(captions))
    index = {c: k for k, c in enumerate(bank_captions)}
    targets = torch.tensor([index[c] for c in captions])
    fit_image_tower(model, images, targets, material.text(bank_captions), material.spec, seed,
                    progress=material.progress)
    seconds = time.perf_counter() - started
    recall = recall_at(encode_images(model, material.test_images) @ material.test_text.T, material.test_truth)
    asr = {name: attack_success_rate(encode_images(model, x) @ material.test_text.T, material.target)
           for name, x in triggered.items()}
    return dict(r1=recall[1], r5=recall[5], asr=asr, train_s=seconds)


def poisoned_case(material: Material, pdir: Path):
    """The poisoned copy's images (clean scan images, poisoned rows replaced by their triggered images), captions
    and poisoned-row mask."""
    from realdata_tower import load_images

    rows = read_csv_rows(pdir / "data.csv")
    poisoned = np.array([row["is_poisoned"] == "1" for row in rows])
    images = material.scan_images.clone()
    changed = np.flatnonzero(poisoned)
    images[changed] = load_images(pdir, material.preprocess, [rows[k]["image"] for k in changed])
    return images, [row["caption"] for row in rows], poisoned


def scan_keep(store: Path, mapper: str | None, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows (store order) that `method` calls benign with its default options, and every row's score (higher is
    more suspect)."""
    from cfbd_fast import scan

    result = scan(store, mapper, method=method)
    rows = np.asarray(result.row_id)
    keep = np.zeros(len(result.verdict), dtype=bool)
    keep[rows[result.kept_rows]] = True
    score = np.full(len(result.verdict), -np.inf)
    score[rows] = np.nan_to_num(np.asarray(result.score, dtype=np.float64), nan=-np.inf)
    return keep, score


def matched_keep(score: np.ndarray, removed: int) -> np.ndarray:
    """All rows but the `removed` highest scored."""
    keep = np.ones(len(score), dtype=bool)
    if removed:
        keep[np.argsort(-score, kind="stable")[:removed]] = False
    return keep


# -- output ---------------------------------------------------------------------------------------------------------
def fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.3f}"
    return str(value)


def print_table(rows: list[dict]) -> None:
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in rows:
        print("| " + " | ".join(fmt(r[c]) if c != "train_s" else f"{r[c]:.0f}" for c in COLUMNS) + " |")


def main(argv=None) -> None:
    import realdata
    from bench_quality import case_store, embed_csv, train_reference_mapper
    from realdata_tower import FULL_TOWER, SMALL_TOWER

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="the test-size data (.cache/realdata-small)")
    ap.add_argument("--work", type=Path, default=ROOT / "bench-data" / "quality",
                    help="bench_quality.py's work folder: its poisoned cases and stores are reused")
    ap.add_argument("--attacks", nargs="*", default=list(ATTACKS))
    ap.add_argument("--rate", type=float, default=0.03, help="poison rate of the scan part")
    ap.add_argument("--poison-seed", type=int, default=2, help="a report seed of bench_quality.py (not tuned on)")
    ap.add_argument("--train-seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--arms", nargs="*", default=list(ARMS))
    ap.add_argument("--no-clean", action="store_true", help="skip the clean arm")
    ap.add_argument("--csv", type=Path, default=None, help="also write the rows to this CSV")
    args = ap.parse_args(argv)

    from _common import machine
    from cfbd_fast.threads import configure_threads

    threads = configure_threads()
    started = time.perf_counter()
    cache = realdata.SMALL_CACHE if args.small else realdata.DEFAULT_CACHE
    data = realdata.ensure_all(cache, small=args.small, progress=False, sizes=None if args.small else (10000,))
    spec = replace(SMALL_TOWER if args.small else FULL_TOWER, epochs=args.epochs, batch_size=args.batch_size)
    work = args.work / ("small" if args.small else "full")
    work.mkdir(parents=True, exist_ok=True)
    model_dir, clean_csv = Path(data["model"]), Path(data["parts"]["scan"])
    clean_store = embed_csv(clean_csv, work / "clean.cfbd", model_dir)
    mapper = str(train_reference_mapper(embed_csv(Path(data["parts"]["mapper"]), work / "mapper.cfbd", model_dir),
                                         work / "mapper.safetensors"))
    material = Material(cache, spec)
    print(f"# bench_defense: {'small' if args.small else 'full'} real-image data; {machine()}; torch threads "
          f"{threads}; rate {args.rate:g}, poison seed {args.poison_seed}; tower {json.dumps(spec.vision)}, "
          f"{spec.epochs} epochs, batch {spec.batch_size}, lr {spec.lr:g}; training seeds {args.train_seeds}; "
          f"{len(material.scan_rows)} scan rows, {len(material.test_truth)} test images", flush=True)

    cases, triggered = {}, {}
    for attack in args.attacks:
        name = f"{attack}-{args.rate:g}-s{args.poison_seed}"
        store = case_store(name, clean_csv, clean_store, model_dir, work, attack=attack, rate=args.rate,
                           seed=args.poison_seed)
        images, captions, poisoned = poisoned_case(material, work / f"{name}.poison")
        keep = {"poisoned": np.ones(len(captions), dtype=bool)}
        keep["cfbd"], _ = scan_keep(store, mapper, "cfbd")
        keep["cosine"], cosine_score = scan_keep(store, None, "cosine")
        keep["cosine-matched"] = matched_keep(cosine_score, int((~keep["cfbd"]).sum()))
        keep = {arm: rows for arm, rows in keep.items() if arm in args.arms}
        cases[attack] = (images, captions, poisoned, keep)
        triggered[attack], _ = triggered_images(cache / "test", work, attack, args.poison_seed, material.preprocess)
    print(f"# cases poisoned, scanned and triggered in {time.perf_counter() - started:.0f} s", flush=True)

    rows = []

    def record(attack, arm, seed, keep, poisoned, result, asr):
        rows.append(dict(attack=attack, arm=arm, train_seed=seed, rows=int(keep.sum()),
                         poison_rows=int((keep & poisoned).sum()), removed=int((~keep).sum()),
                         removed_poison=int((~keep & poisoned).sum()), asr=asr, r1=result["r1"], r5=result["r5"],
                         train_s=result["train_s"]))
        print(json.dumps({k: fmt(v) for k, v in rows[-1].items()}), flush=True)

    for seed in args.train_seeds:
        if not args.no_clean:
            captions = [row["caption"] for row in material.scan_rows]
            result = train_and_measure(material, material.scan_images, captions, triggered, seed)
            everything, nothing = np.ones(len(captions), dtype=bool), np.zeros(len(captions), dtype=bool)
            for attack in args.attacks:
                record(attack, "clean", seed, everything, nothing, result, result["asr"][attack])
        for attack, (images, captions, poisoned, keep) in cases.items():
            trained = {}  # the same rows, seed and schedule give the same tower: train each row set once
            for arm in [a for a in ARMS if a in keep]:
                key = keep[arm].tobytes()
                if key not in trained:
                    rows_kept = np.flatnonzero(keep[arm])
                    trained[key] = train_and_measure(material, images[rows_kept], [captions[k] for k in rows_kept],
                                                     {attack: triggered[attack]}, seed)
                result = trained[key]
                record(attack, arm, seed, keep[arm], poisoned, result, result["asr"][attack])

    order = {arm: k for k, arm in enumerate(("clean",) + ARMS)}
    rows.sort(key=lambda r: (args.attacks.index(r["attack"]), order[r["arm"]], r["train_seed"]))
    print(f"\n## defense effect, rate {args.rate:g}, poison seed {args.poison_seed}, {spec.epochs} epochs "
          f"({time.perf_counter() - started:.0f} s in all)\n")
    print_table(rows)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
