"""`cfbd_fast.scan`: the CFBD pipeline over a store, out of core.

mapper -> consistency -> GMM -> seeds -> cluster test -> correlation -> score -> threshold -> verdict.

Memory: one chunk of each matrix at a time plus O(N) float32 score arrays. `scan()` returns a `ScanResult`;
`ScanResult.write(out_dir)` publishes scores.parquet, poisoned.txt, keep.txt, keep.parquet, invalid.txt and
summary.json (each written under a temporary name, renamed into place at the end).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import __version__, ops
from .detect import baselines, coarse, fine, metrics, seeds, threshold
from .errors import InputError
from .ops._dispatch import as_tensor
from .progress import progress_bar
from .store import EmbeddingStore

if TYPE_CHECKING:
    import pyarrow as pa

METHODS = ("cfbd", "cfbd-paper", "coarse", "cosine", "safeclip")
NEEDS_MAPPER = {"cfbd", "cfbd-paper", "coarse"}
# Defaults per method; None in the user's options means "take the method's". The paper's everywhere but cfbd.
_PAPER_DEFAULTS = {"seed_select": "top", "score": "z"}
_METHOD_DEFAULTS = {"cfbd": {"seed_select": "dense", "score": "z-so"}}
DEFAULT_THRESHOLD_METHOD = "gap"
SUBSETS = np.array(["benign", "seed", "suspicious", "invalid"])
VERDICTS = np.array(["benign", "poisoned", "invalid"])
BENIGN, SEED, SUSPICIOUS, INVALID = 0, 1, 2, 3
V_BENIGN, V_POISONED, V_INVALID = 0, 1, 2


@dataclass
class ScanConfig:
    method: str = "cfbd"
    k: int = 5
    gamma: float = 0.9
    q: int = 50
    seed_select: str | None = None
    reduce: str = "mean"
    topk: int = 5
    score: str | None = None
    threshold: float | None = None
    threshold_method: str = DEFAULT_THRESHOLD_METHOD
    fpr: float = 0.001
    min_cluster: int = 5
    cluster_min_relative: float = 0.5
    chunk_rows: int = 16384  # rows streamed at a time: the working set, with the mapper's activations
    device: str = "cpu"
    seed: int = 0
    self_sample: int = 100_000
    # --mapper self: a linear map (depth 1) fitted with small batches; seconds on a CPU for 100k rows
    self_options: dict = field(default_factory=lambda: {"depth": 1, "batch_size": 256, "lr": 3e-3, "epochs": 3})
    knn_bank: int = 20_000
    knn_k: int = 10

    def resolved(self) -> "ScanConfig":
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        defaults = _METHOD_DEFAULTS.get(self.method, _PAPER_DEFAULTS)
        out = ScanConfig(**{**self.__dict__, "self_options": dict(self.self_options)})
        out.seed_select = self.seed_select or defaults["seed_select"]
        out.score = self.score or defaults["score"]
        if out.seed_select not in ("top", "dense"):
            raise InputError(f"unknown --seed-select {out.seed_select!r}: use top or dense")
        if out.score not in fine.SCORES:
            raise InputError(f"unknown --score {out.score!r}: use one of {', '.join(fine.SCORES)}")
        if out.reduce not in ("mean", "max", "topk"):
            raise InputError(f"unknown --reduce {out.reduce!r}: use mean, max or topk")
        if out.threshold_method not in threshold.ESTIMATORS:
            raise InputError(f"unknown --threshold-method {out.threshold_method!r}: use one of "
                             f"{', '.join(threshold.ESTIMATORS)}")
        if out.q < 1 or out.k < 1 or not (0.0 < out.gamma < 1.0) or not (0.0 < out.fpr < 1.0):
            raise InputError("need q >= 1, k >= 1, 0 < gamma < 1 and 0 < fpr < 1")
        if out.chunk_rows < 1:
            raise InputError("--chunk-rows must be at least 1")
        return out


@dataclass
class ScanResult:
    store_path: str
    row_id: np.ndarray
    keys: "pa.Array"  # source keys (pyarrow strings, row-aligned)
    s_o: np.ndarray
    s_g: np.ndarray
    c: np.ndarray
    posterior: np.ndarray
    subset: np.ndarray  # int8 codes into SUBSETS
    z: np.ndarray
    score: np.ndarray
    verdict: np.ndarray  # int8 codes into VERDICTS
    summary: dict = field(default_factory=dict)
    store: EmbeddingStore | None = field(default=None, repr=False)  # the scanned store, for keep.parquet

    @property
    def poisoned_rows(self) -> np.ndarray:
        return np.flatnonzero(self.verdict == V_POISONED)

    @property
    def kept_rows(self) -> np.ndarray:
        return np.flatnonzero(self.verdict == V_BENIGN)

    @property
    def invalid_rows(self) -> np.ndarray:
        return np.flatnonzero(self.verdict == V_INVALID)

    def write(self, out_dir: str | Path) -> Path:
        """Publish the outputs in `out_dir`; every file appears complete or not at all."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".cfbd-scan-{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        table = pa.table({
            "row_id": self.row_id, "key": self.keys,
            "s_o": self.s_o, "s_g": self.s_g, "c": self.c, "posterior": self.posterior,
            "subset": pa.array(SUBSETS[self.subset]).dictionary_encode(),
            "z": self.z, "score": self.score,
            "verdict": pa.array(VERDICTS[self.verdict]).dictionary_encode(),
        })
        pq.write_table(table, tmp / "scores.parquet")
        for name, rows in (("poisoned.txt", self.poisoned_rows), ("keep.txt", self.kept_rows),
                           ("invalid.txt", self.invalid_rows)):
            with open(tmp / name, "w", encoding="utf-8") as fh:
                fh.writelines(f"{k}\n" for k in self.keys.take(rows).to_pylist())
        store = self.store or EmbeddingStore.open(self.store_path)
        pq.write_table(store.meta.take(pa.array(self.kept_rows)), tmp / "keep.parquet")
        (tmp / "summary.json").write_text(json.dumps(self.summary, indent=2, default=json_default) + "\n")
        for f in sorted(tmp.iterdir()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(f, out / f.name)
        tmp.rmdir()
        return out


def json_default(o):
    """`json.dumps(default=...)` for the numpy scalars and arrays in a summary."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class _Timer:
    def __init__(self, device):
        self.stages: dict[str, float] = {}
        self._device = device

    def sync(self):
        if str(self._device).startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def add(self, name: str, seconds: float):
        self.stages[name] = self.stages.get(name, 0.0) + seconds


def _resolve_mapper(mapper, store: EmbeddingStore, cfg: ScanConfig, progress: bool):
    """A mapper object from a path, "self", "knn" or an object with .map(); plus a fingerprint."""
    from . import mapper as mapper_mod

    if mapper is None:
        raise InputError(f"method {cfg.method} needs a mapping network: pass --mapper PATH, self or knn")
    if isinstance(mapper, (str, Path)) and str(mapper) == "self":
        m = mapper_mod.fit_self_mapper_on_store(store, sample=cfg.self_sample, seed=cfg.seed, device=cfg.device,
                                                progress=progress, **cfg.self_options)
        return m, "self:" + _digest(json.dumps(m.config, sort_keys=True, default=str))
    if isinstance(mapper, (str, Path)) and str(mapper) == "knn":
        m = mapper_mod.KnnMapper.from_store(store, bank=cfg.knn_bank, k=cfg.knn_k, seed=cfg.seed)
        return m, "knn:" + _digest(json.dumps(m.config, sort_keys=True, default=str))
    if isinstance(mapper, (str, Path)):
        path = Path(mapper)
        m = mapper_mod.load_mapper(path, expect_model=store.info.get("model"), expect_dim=store.dim)
        return m, "file:" + _file_digest(path)
    if not hasattr(mapper, "map"):
        raise InputError("mapper must be a path, 'self', 'knn' or an object with .map(image, rows)")
    return mapper, "object:" + _digest(json.dumps(getattr(mapper, "config", {}), sort_keys=True, default=str))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _rows_of(store: EmbeddingStore, matrix: str):
    """A function returning float32 rows of one matrix, in the order asked (read in sorted order)."""
    data = store.matrix(matrix)

    def fetch(rows: np.ndarray) -> np.ndarray:
        order = np.argsort(rows)
        out = np.empty((len(rows), store.dim), dtype=np.float32)
        out[order] = data[rows[order]]
        return out
    return fetch


_LABEL_KEY_COLUMNS = ("key", "image_path", "image", "url")
_LABEL_COLUMNS = ("is_poisoned", "label", "is_backdoor")


def _load_labels(store: EmbeddingStore, labels_path: Path | None, keys) -> np.ndarray | None:
    """Ground truth per row: from --labels (parquet/CSV: key + is_poisoned/label) or the store's is_poisoned."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if labels_path is None:
        meta = store.meta
        if "is_poisoned" not in meta.column_names:
            return None
        col = meta.column("is_poisoned")
        if col.null_count == len(col):
            return None
        return np.asarray(col.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
    path = Path(labels_path)
    if not path.exists():
        raise InputError(f"{path}: labels file not found")
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            import pyarrow.csv as pacsv

            keys_as_text = {c: pa.string() for c in _LABEL_KEY_COLUMNS}  # keep leading zeros of 9-digit keys
            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=keys_as_text))
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise InputError(f"{path}: cannot read labels ({exc}); expected parquet or CSV") from exc
    label_col = next((c for c in _LABEL_COLUMNS if c in table.column_names), None)
    key_col = next((c for c in _LABEL_KEY_COLUMNS if c in table.column_names), None)
    if label_col is None or key_col is None:
        raise InputError(f"{path}: needs a key column (key/image_path/image/url) and a label column "
                         f"(is_poisoned/label/is_backdoor); has {', '.join(table.column_names)}")
    label_keys = table.column(key_col).cast(pa.string())
    idx = pc.index_in(keys, value_set=label_keys)
    values = np.asarray(table.column(label_col).cast(pa.int8()).fill_null(0).to_numpy(zero_copy_only=False)) != 0
    found = np.asarray(idx.is_valid().to_numpy(zero_copy_only=False))  # keys without a label count as clean
    return found & values[np.asarray(idx.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)]


def scan(store: str | Path | EmbeddingStore, mapper=None, *, config: ScanConfig | None = None,
         labels: str | Path | None = None, progress: bool = False, **options) -> ScanResult:
    """Run a detection method over every row of `store` and return per-row scores and verdicts.

    `mapper`: a mapper file (safetensors + JSON written by `train-mapper`), "self", "knn" or a mapper object.
    Options are ScanConfig fields (method, k, gamma, q, seed_select, reduce, score, threshold, fpr, device, ...).
    """
    import torch

    if config is not None and options:
        raise InputError("pass either config= or keyword options, not both")
    cfg = (config or ScanConfig(**options)).resolved()
    t_start = time.perf_counter()
    timer = _Timer(cfg.device)
    store = store if isinstance(store, EmbeddingStore) else EmbeddingStore.open(store)
    n = len(store)
    if n == 0:
        raise InputError(f"{store.path}: the store is empty; nothing to scan")
    if cfg.method in NEEDS_MAPPER and cfg.q > n:
        raise InputError(f"--q {cfg.q} is larger than the store ({n} rows): lower --q")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available; use --device cpu")
    device = torch.device(cfg.device)
    meta = store.meta
    keys = meta.column("key").combine_chunks()
    timer.add("open", time.perf_counter() - t_start)

    # -- mapper -----------------------------------------------------------------------------------------
    mapper_fp = None
    if cfg.method in NEEDS_MAPPER:
        t0 = time.perf_counter()
        mapper, mapper_fp = _resolve_mapper(mapper, store, cfg, progress)
        if hasattr(mapper, "to"):
            mapper = mapper.to(device)
        timer.add("mapper_fit", time.perf_counter() - t0)

    # -- pass 1: consistency ----------------------------------------------------------------------------
    s_o = np.empty(n, dtype=np.float32)
    s_g = np.full(n, np.nan, dtype=np.float32)
    c = np.full(n, np.nan, dtype=np.float32)
    with progress_bar("consistency", n, enabled=progress) as bar, torch.no_grad():
        for chunk in store.iter_chunks(rows=cfg.chunk_rows, matrices=("image", "text")):
            lo, hi = chunk.start, chunk.stop
            t0 = time.perf_counter()
            img = as_tensor(chunk.image, "image").to(device, non_blocking=True)
            txt = as_tensor(chunk.text, "text").to(device, non_blocking=True)
            timer.sync()
            timer.add("read", time.perf_counter() - t0)
            if cfg.method in NEEDS_MAPPER:
                t0 = time.perf_counter()
                gen = mapper.map(img.float(), np.arange(lo, hi))
                timer.sync()
                timer.add("mapper", time.perf_counter() - t0)
            else:
                gen = txt  # unused: baselines need s_o only
            t0 = time.perf_counter()
            cc, so, sg = ops.consistency(img, txt, gen)
            s_o[lo:hi] = so.cpu().numpy()
            if cfg.method in NEEDS_MAPPER:
                s_g[lo:hi] = sg.cpu().numpy()
                c[lo:hi] = cc.cpu().numpy()
            timer.add("consistency", time.perf_counter() - t0)
            bar.advance(hi - lo)
    # The consistency kernel returns NaN for every row that row_health() marks invalid (NaN/inf or zero norm
    # in the image, the caption or the generated caption): no separate pass over the matrices.
    invalid = np.isnan(c) if cfg.method in NEEDS_MAPPER else np.isnan(s_o)
    valid = ~invalid
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise InputError(f"{store.path}: every row has a NaN/inf or zero-norm embedding; nothing to scan")

    summary: dict = {}
    posterior = np.full(n, np.nan, dtype=np.float32)
    z = np.full(n, np.nan, dtype=np.float32)
    subset = np.full(n, SUSPICIOUS, dtype=np.int8)
    subset[invalid] = INVALID
    verdict = np.full(n, V_BENIGN, dtype=np.int8)
    verdict[invalid] = V_INVALID
    seed_rows = np.zeros(0, dtype=np.int64)

    if cfg.method in NEEDS_MAPPER:
        # -- coarse stage ------------------------------------------------------------------------------
        t0 = time.perf_counter()
        if n_valid < cfg.k:
            raise InputError(f"{store.path}: {n_valid} valid rows is fewer than --k {cfg.k}")
        split = coarse.coarse_split(c, valid, k=cfg.k, gamma=cfg.gamma, seed=cfg.seed)
        posterior = split.posterior
        timer.add("gmm", time.perf_counter() - t0)
        t0 = time.perf_counter()
        captions_of, images_of = _rows_of(store, "text"), _rows_of(store, "image")
        seed_rows = seeds.select_seeds(c, valid, min(cfg.q, n_valid), mode=cfg.seed_select, captions_of=captions_of)
        rng = np.random.default_rng(cfg.seed)
        null_rows = np.sort(rng.choice(np.flatnonzero(valid), size=min(2000, n_valid), replace=False))
        null_coherence = seeds.mean_pairwise_cosine(captions_of(null_rows))
        subset[valid & split.benign] = BENIGN
        subset[seed_rows] = SEED
        if cfg.method == "cfbd":
            # Examine the seed set's caption clusters, densest first; duplicate families are set aside.
            null_image_coherence = seeds.mean_pairwise_cosine(images_of(null_rows))
            remaining, examined = seed_rows, 0
            while True:
                in_cluster = fine.prune_to_cluster(remaining, captions_of(remaining), null_coherence,
                                                   cfg.cluster_min_relative)
                cluster_rows = remaining[in_cluster]
                examined += 1
                verdict_info = fine.cluster_verdict(
                    n_members=len(cluster_rows), min_members=min(cfg.min_cluster, cfg.q),
                    image_coherence=seeds.mean_pairwise_cosine(images_of(cluster_rows)),
                    null_image_coherence=null_image_coherence, max_relative=cfg.cluster_min_relative)
                remaining = remaining[~in_cluster]
                if verdict_info["found"] or len(cluster_rows) < min(cfg.min_cluster, cfg.q) or len(remaining) == 0:
                    break
            verdict_info["clusters_examined"] = examined
        else:
            cluster_rows, verdict_info = seed_rows, {"found": True, "reason": "the paper's method has no cluster test"}
        found = verdict_info["found"]
        corr_rows = cluster_rows if len(cluster_rows) else seed_rows
        corr_captions = captions_of(corr_rows)
        summary["cluster"] = {
            **verdict_info,
            "seed_rows": len(seed_rows),
            "cluster_rows": len(cluster_rows),
            "null_coherence": null_coherence,
            "cluster_coherence": seeds.mean_pairwise_cosine(corr_captions),
        }
        timer.add("seeds", time.perf_counter() - t0)

        # -- pass 2: correlation with the seed captions ------------------------------------------------
        t0 = time.perf_counter()
        seed_t = torch.from_numpy(corr_captions).to(device)
        with progress_bar("correlation", n, enabled=progress) as bar, torch.no_grad():
            for chunk in store.iter_chunks(rows=cfg.chunk_rows, matrices=("text",)):
                txt = as_tensor(chunk.text, "text").to(device, non_blocking=True)
                zz = ops.seed_correlation(txt, seed_t, reduce=cfg.reduce, k=cfg.topk if cfg.reduce == "topk" else None)
                z[chunk.start:chunk.stop] = zz.cpu().numpy()
                bar.advance(chunk.stop - chunk.start)
        timer.sync()
        timer.add("correlation", time.perf_counter() - t0)

        # -- verdict ------------------------------------------------------------------------------------
        t0 = time.perf_counter()
        if cfg.method == "coarse":  # every row that is not confidently benign; c is the ranking
            score, thr, estimates = c.copy(), float("nan"), {}
            verdict[(subset == SEED) | (subset == SUSPICIOUS)] = V_POISONED
        else:
            score = fine.fine_score(z, s_o, cfg.score)
            score[invalid] = np.nan
            estimates = threshold.all_estimates(score, reference=valid & split.benign, fpr=cfg.fpr, seed=cfg.seed)
            thr = cfg.threshold if cfg.threshold is not None else estimates[cfg.threshold_method]
            if cfg.method == "cfbd-paper":
                verdict[seed_rows] = V_POISONED
                verdict[(subset == SUSPICIOUS) & (score > thr)] = V_POISONED
            elif found:
                verdict[valid & (score > thr)] = V_POISONED
        timer.add("verdict", time.perf_counter() - t0)
        summary["gmm"] = split.gmm_summary()
    else:
        t0 = time.perf_counter()
        if cfg.method == "cosine":
            score = baselines.cosine_score(s_o)
            estimates = {"null-quantile": threshold.null_quantile(score, valid, cfg.fpr)}
            thr = cfg.threshold if cfg.threshold is not None else estimates["null-quantile"]
            verdict[valid & (score > thr)] = V_POISONED
        else:  # safeclip
            score, gmm_info = baselines.safeclip_score(s_o, valid, seed=cfg.seed)
            thr = cfg.threshold if cfg.threshold is not None else 1.0 - 0.9
            estimates = {}
            summary["gmm"] = gmm_info
            verdict[valid & (score > thr)] = V_POISONED
        score = score.astype(np.float32)
        score[invalid] = np.nan
        subset[valid] = SUSPICIOUS
        timer.add("verdict", time.perf_counter() - t0)

    elapsed = time.perf_counter() - t_start
    result = ScanResult(store_path=str(store.path), row_id=np.arange(n, dtype=np.int64), keys=keys, s_o=s_o,
                        s_g=s_g, c=c, posterior=posterior, subset=subset, z=z, score=score, verdict=verdict,
                        store=store)
    gt = _load_labels(store, labels, keys)
    summary.update({
        "cfbd_fast_version": __version__,
        "config": {**cfg.__dict__, "labels": str(labels) if labels else None},
        "store": {"path": str(store.path), "fingerprint": store.fingerprint, "rows": n, "dim": store.dim,
                  "dtype": str(store.dtype), "model": store.info.get("model")},
        "mapper": mapper_fp,
        "seeds": {"rows": seed_rows.tolist(), "keys": keys.take(seed_rows).to_pylist()},
        "counts": {
            "subset": {name: int(np.sum(subset == i)) for i, name in enumerate(SUBSETS)},
            "verdict": {name: int(np.sum(verdict == i)) for i, name in enumerate(VERDICTS)},
        },
        "threshold": {"value": thr, "method": "given" if cfg.threshold is not None else cfg.threshold_method,
                      "estimates": estimates, "score": cfg.score if cfg.method in NEEDS_MAPPER else cfg.method},
        "timings_s": {k: round(v, 4) for k, v in timer.stages.items()} | {"total": round(elapsed, 4)},
        "rows_per_s": n / elapsed if elapsed > 0 else None,
        "device": _device_name(device),
        "versions": _versions(),
    })
    if gt is not None:
        summary["metrics"] = metrics.detection_metrics(gt[valid], verdict[valid] == V_POISONED, score[valid])
        if len(seed_rows):
            summary["metrics"]["seed_precision"] = float(gt[seed_rows].mean())
    result.summary = summary
    return result


def _device_name(device) -> str:
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("numpy", "torch", "triton", "numba"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out
