"""The material of bench_quality.py: per (domain, tower, size) the clean scan part embedded, a mapper trained on the
domain's clean mapper part, and each case's store (the clean store with the rows a case changed re-embedded), all
cached under bench-data/quality/<domain>/ so reruns are cheap."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench-data" / "quality"
TRIGGERS = ("badnets", "blended", "sig", "wanet")
TRIGGER_RATES = {"1%": 0.01, "0.3%": 0.003, "3%": 0.03}
SECOND_TARGET = "pizza"
BOILERPLATE_CAPTION, BOILERPLATE_ROWS = "Image.", 30
CLEAN_CASES = ("clean", "image-group")  # no poisoned rows: every flagged row is a false positive


def case_specs(poison_seed: int = 1) -> dict[str, dict | None]:
    """Every case by name: the arguments of `poison_dataset`, None for the clean copy, {"group": ...} for a clean
    copy with one boilerplate group (unrelated images that share one caption)."""
    cases: dict[str, dict | None] = {}
    for attack in TRIGGERS:
        for label, rate in TRIGGER_RATES.items():
            cases[f"{attack}-{label}"] = dict(attack=attack, rate=rate, seed=poison_seed)
    cases["clean"] = None
    cases["image-group"] = dict(group=BOILERPLATE_CAPTION, rows=BOILERPLATE_ROWS, seed=poison_seed)
    cases["two-targets"] = dict(attack="multi-trigger", targets=["banana", SECOND_TARGET],
                                multi_attacks=["badnets", "blended"], rate=0.01, seed=poison_seed)
    cases["paraphrased"] = dict(attack="badclip-style", rate=0.01, seed=poison_seed)
    cases["one-caption"] = dict(attack="one-caption", rate=0.01, seed=poison_seed)
    return cases


def embed_csv(csv_path: Path, out: Path, model_dir: Path) -> Path:
    from cfbd_fast.embed.runner import embed

    out.parent.mkdir(parents=True, exist_ok=True)
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


def replaced_store(out: Path, clean_store: Path, model_dir: Path, rows: np.ndarray, images: list[str],
                   captions: list[str], poisoned: bool) -> Path:
    """The clean store with `rows` replaced by the embeddings of (`images`, `captions`) (absolute image paths), their
    captions and sources updated, and `is_poisoned` set on them when `poisoned`."""
    import pyarrow as pa

    from cfbd_fast.store import EmbeddingStore

    if (out / "store.json").exists():
        return out
    changed = out.with_suffix(".changed.csv")
    with open(changed, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        writer.writerows(zip(images, captions))
    new = EmbeddingStore.open(embed_csv(changed, out.with_suffix(".changed.cfbd"), model_dir))
    base = EmbeddingStore.open(clean_store)
    image, text = np.array(base.image), np.array(base.text)
    image[rows], text[rows] = new.image, new.text
    meta = base.meta.to_pydict()
    truth = np.zeros(len(base), dtype=bool)
    truth[rows] = poisoned
    for r, path, caption in zip(rows, images, captions):
        meta["caption"][r] = caption
        if "source" in meta:  # the changed rows' images (thumbnails in `cfbd-fast report`)
            meta["source"][r] = path
    meta["is_poisoned"] = truth.tolist()
    EmbeddingStore.from_arrays(out, image=image, text=text, meta=pa.table(meta), model=base.model,
                               pretrained=base.pretrained, normalized=True).close()
    return out


def case_store(name: str, clean_csv: Path, clean_store: Path, model_dir: Path, work: Path,
               poison_dir: Path | None = None, **poison) -> Path:
    """The clean store with the rows `poison_dataset` changed replaced by their new embeddings (the poisoned copy is
    written to `poison_dir`, default work/<name>.poison, and shared by every tower)."""
    import pyarrow.parquet as pq

    from cfbd_fast.poison import poison_dataset

    out = work / f"{name}.cfbd"
    if (out / "store.json").exists():
        return out
    pdir = poison_dir or work / f"{name}.poison"
    if not (pdir / "data.csv").exists():
        poison_dataset(clean_csv, pdir, clean_images="reference", progress=False, force=True, **poison)
    rows = np.asarray(pq.read_table(pdir / "poison_record.parquet").column("row").to_numpy(), dtype=np.int64)
    with open(pdir / "data.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    return replaced_store(out, clean_store, model_dir, rows, [str((pdir / table[r]["image"]).resolve()) for r in rows],
                          [table[r]["caption"] for r in rows], poisoned=True)


def group_store(name: str, clean_csv: Path, clean_store: Path, model_dir: Path, work: Path, group: str, rows: int,
                seed: int) -> Path:
    """A clean copy in which `rows` unrelated images (plain rows of distinct identities) share the caption `group`."""
    import realdata

    labels = realdata.read_labels(clean_csv.parent)
    rng = np.random.default_rng([seed, 30])
    chosen, seen = [], set()
    for r in rng.permutation(len(labels)):
        if labels[r]["kind"] == "plain" and labels[r]["identity"] not in seen:
            chosen.append(int(r))
            seen.add(labels[r]["identity"])
        if len(chosen) == rows:
            break
    chosen = np.sort(np.array(chosen))
    images = [str((clean_csv.parent / labels[r]["image"]).resolve()) for r in chosen]
    return replaced_store(work / f"{name}.cfbd", clean_store, model_dir, chosen, images, [group] * len(chosen),
                          poisoned=False)


@dataclass
class Cell:
    """One (domain, tower, size) of the benchmark: its clean store, reference mapper and case stores."""
    domain: str
    tower: str
    size: int
    work_root: Path = WORK

    def build(self) -> "Cell":
        import realdata

        data = realdata.ensure_all(domain_name=self.domain, sizes=(self.size,), towers=(self.tower,),
                                   progress=False)
        self.model_dir = Path(data["model"])
        self.retrieval = data["retrieval"]
        self.clean_csv = Path(data["parts"]["scan"])
        tower_dir = self.work_root / self.domain / self.tower
        self.work = tower_dir / str(self.size)
        self.poison_root = self.work_root / self.domain / "poison" / str(self.size)
        self.clean_store = embed_csv(self.clean_csv, self.work / "clean.cfbd", self.model_dir)
        mapper_store = embed_csv(Path(data["parts"]["mapper"]), tower_dir / "mapper.cfbd", self.model_dir)
        self.mapper = train_reference_mapper(mapper_store, tower_dir / "mapper.safetensors")
        return self

    @property
    def name(self) -> str:
        return f"{self.domain}/{self.tower}/{self.size}"

    def case(self, name: str, spec: dict | None) -> Path:
        if spec is None:
            return self.clean_store
        name = f"{name}-s{spec['seed']}"
        if "group" in spec:
            return group_store(name, self.clean_csv, self.clean_store, self.model_dir, self.work, **spec)
        return case_store(name, self.clean_csv, self.clean_store, self.model_dir, self.work,
                          poison_dir=self.poison_root / name, **spec)
