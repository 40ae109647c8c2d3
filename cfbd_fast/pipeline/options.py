"""The one list of scan choices: methods, scores, estimators, reductions, seed selectors, their defaults and help.

The CLI builds its choices and help text from these declarations and `ScanConfig.validated()` is the one place
that checks a configuration; every stage after it trusts its input. A new method is one `Method` entry.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

from ..errors import InputError


@dataclass(frozen=True)
class Method:
    """A detection method as a declarative record: which seeds, which score, which verdict rule."""
    name: str
    help: str
    needs_mapper: bool
    seed_select: str | None = None  # default seed selector (None: no seed set)
    score: str | None = None  # default fine-stage score; for baselines the score they compute
    verdict: str = "threshold"  # see VERDICT_RULES
    threshold_method: str = "gap"  # default threshold estimator
    reduce: str = "mean"  # default reduction of a caption's cosines to the seed captions


VERDICT_RULES = {
    "clusters": "rows significant for a caption cluster whose statistics make it a backdoor",
    "paper": "the seed set, plus suspicious rows above the threshold (the paper's rule)",
    "coarse": "every row that the coarse stage does not call benign",
    "threshold": "rows whose score is above the threshold",
}

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("cfbd", "CFBD with every caption cluster of the seed pool examined, the score z - s_o and an "
           "error-controlled verdict", True, seed_select="dense", score="z-so", verdict="clusters",
           threshold_method="fdr", reduce="topk"),
    Method("cfbd-paper", "CFBD as the paper states it: top-q seeds, the score z", True,
           seed_select="top", score="z", verdict="paper"),
    Method("coarse", "the coarse stage alone: flag all that the GMM does not call benign", True,
           seed_select="top", score="z", verdict="coarse"),
    Method("cosine", "baseline: CLIP-score filtering, score 1 - s_o", False, score="cosine"),
    Method("safeclip", "baseline: SafeCLIP's 2-component GMM on s_o", False, score="safeclip"),
)}

SEED_SELECTORS = {
    "top": "the q rows with the largest c (the paper)",
    "dense": "among the top 20q rows by c, the q whose captions agree most with each other",
}
SCORES = {
    "z-so": "z minus the pair's own s_o (keeps genuine target-class pairs out)",
    "z": "the paper's textual correlation with the seed captions",
}
REDUCTIONS = {
    "mean": "mean cosine to the seed captions (the paper)",
    "max": "largest cosine to a seed caption",
    "topk": "mean of the --topk largest cosines",
}
THRESHOLD_METHODS = {
    "fdr": "per-row p-values under a robust normal null; Benjamini-Hochberg at --fdr (cfbd: among the rows of "
           "clusters found at family-wise error --alpha)",
    "fwer": "Bonferroni on the same p-values, family-wise error rate --alpha",
    "gap": "the widest gap in the top 5% of scores",
    "robust-z": "median + z(1 - fpr) x 1.4826 MAD over all rows",
    "null-quantile": "the (1 - fpr) quantile over the coarse benign subset",
    "mixture": "where a 2-component GMM on the score turns to its upper component",
}
MAPPER_PRECISIONS = {"auto": "fp16 on CUDA, fp32 on the CPU", "fp32": "float32 matmuls",
                     "fp16": "float16 matmuls with float32 accumulation", "bf16": "bfloat16 matmuls"}
DEVICES = {"cpu": "the CPU path (numba row passes and torch blocks over threads)",
           "cuda": "the Triton kernels on a CUDA device"}

# The outputs' vocabulary: each row's coarse subset and verdict, stored as int8 codes into these arrays.
SUBSETS = ("benign", "seed", "suspicious", "invalid")
VERDICTS = ("benign", "poisoned", "invalid")
BENIGN, SEED, SUSPICIOUS, INVALID = 0, 1, 2, 3
V_BENIGN, V_POISONED, V_INVALID = 0, 1, 2

# The integer options' bounds: past them a scan would overflow a counter or a library's argument, or ask for
# memory no machine has (the memory a scan needs is checked against the free memory once the store is open).
MAX_ROWS = 2**40
MAX_THREADS = 4096
BOUNDS = {
    "components": (1, 100),
    "seed_set_size": (1, MAX_ROWS),
    "topk": (1, 100_000),
    "min_cluster": (1, MAX_ROWS),
    "max_clusters": (1, 1000),
    "chunk_rows": (1, 2**24),
    "random_seed": (0, 2**32 - 1),
    "self_sample": (2, 2**28),
    "knn_bank": (2, 2**28),
    "knn_neighbours": (1, 2**28),
}

# Old keyword names of scan() still accepted: the paper's symbols.
ALIASES = {"q": "seed_set_size", "k": "components", "seed": "random_seed"}


@dataclass
class ScanConfig:
    """Every scan option. `method` decides `seed_select` and `score` when they are None."""
    method: str = "cfbd"
    components: int = 5  # the paper's K
    gamma: float = 0.9
    seed_set_size: int = 50  # the paper's q
    seed_select: str | None = None
    reduce: str | None = None
    topk: int = 5
    score: str | None = None
    threshold: float | None = None
    threshold_method: str | None = None
    fdr: float = 0.01
    alpha: float = 0.05
    fpr: float = 0.001
    min_cluster: int = 10
    max_clusters: int = 32
    test_one_caption_groups: bool = False  # also test clusters that are mostly one caption string
    chunk_rows: int = 16384  # rows streamed at a time: the working set, with the mapper's activations
    device: str = "cpu"
    timings: bool = False  # per-stage times: synchronise the device after every stage (slower on CUDA)
    device_memory_share: float | None = None  # caption matrix kept on the device if it fits; None: CUDA 0.5, CPU 0
    mapper_precision: str = "auto"  # matmul precision of an MLP mapper (see MAPPER_PRECISIONS)
    stage_chunks: bool | None = None  # chunks through double-buffered staging (None: on CUDA only)
    random_seed: int = 0
    threads: int | None = None  # torch/numba threads; None: from the available cores and the machine's load
    self_sample: int = 100_000
    # --mapper self: a linear map (depth 1) fitted with small batches; seconds on a CPU for 100k rows
    self_options: dict = field(default_factory=lambda: {"depth": 1, "batch_size": 256, "lr": 3e-3, "epochs": 3})
    knn_bank: int = 20_000
    knn_neighbours: int = 10
    allow_incomplete: bool = False  # scan a store whose embedding was stopped (refused otherwise)

    @classmethod
    def from_options(cls, **options) -> "ScanConfig":
        """A config from keyword options (old names such as q, k and seed accepted); unknown names refused."""
        names = {f.name for f in fields(cls)}
        out = {}
        for key, value in options.items():
            key = ALIASES.get(key, key)
            if key not in names:
                raise InputError(f"unknown scan option {key!r}: use one of {', '.join(sorted(names))}")
            out[key] = value
        return cls(**out)

    @property
    def spec(self) -> Method:
        return METHODS[self.method]

    def validated(self) -> "ScanConfig":
        """The checked config with the method's defaults filled in; raises InputError naming the option."""
        _choice("method", self.method, METHODS)
        method = METHODS[self.method]
        out = replace(self, self_options=dict(self.self_options),
                      seed_select=self.seed_select or method.seed_select or "top",
                      score=self.score or method.score,
                      threshold_method=self.threshold_method or method.threshold_method,
                      reduce=self.reduce or method.reduce)
        _choice("seed_select", out.seed_select, SEED_SELECTORS)
        if method.needs_mapper:
            _choice("score", out.score, SCORES)
        _choice("reduce", out.reduce, REDUCTIONS)
        _choice("threshold_method", out.threshold_method, THRESHOLD_METHODS)
        _choice("device", out.device.split(":")[0], DEVICES)
        _choice("mapper_precision", out.mapper_precision, MAPPER_PRECISIONS)
        if out.device_memory_share is not None and (isinstance(out.device_memory_share, bool) or not isinstance(
                out.device_memory_share, (int, float)) or not 0.0 <= out.device_memory_share <= 1.0):
            raise InputError(f"{option_name('device_memory_share')} must be between 0 and 1, "
                             f"got {out.device_memory_share!r}")
        for name, (low, high) in BOUNDS.items():
            _between(name, getattr(out, name), low, high)
        if out.threads is not None:
            _between("threads", out.threads, 1, MAX_THREADS)
        if out.knn_neighbours >= out.knn_bank:
            raise InputError(f"{option_name('knn_neighbours')} must be below knn_bank ({out.knn_bank:,}), the "
                             f"captions the neighbours are chosen from; got {out.knn_neighbours!r}")
        _open_unit("gamma", out.gamma)
        _open_unit("fpr", out.fpr)
        _open_unit("fdr", out.fdr)
        _open_unit("alpha", out.alpha)
        if out.threshold is not None and not math.isfinite(out.threshold):
            raise InputError(f"{option_name('threshold')} must be a finite number, got {out.threshold}")
        return out

    def as_dict(self) -> dict:
        return asdict(self)


def option_name(field_name: str) -> str:
    """A config field as both kinds of user spell it: the Python keyword and the command-line option."""
    return f"{field_name} (--{field_name.replace('_', '-')})"


def _choice(name: str, value, choices: dict) -> None:
    if value not in choices:
        raise InputError(f"{option_name(name)} {value!r} is not a choice: use one of {', '.join(choices)}")


def _between(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InputError(f"{option_name(name)} must be a whole number from {low:,} to {high:,}, got {value!r}")


def _open_unit(name: str, value) -> None:
    if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise InputError(f"{option_name(name)} must be between 0 and 1 (exclusive), got {value!r}")


# -- memory -------------------------------------------------------------------------------------------------------
def memory_needed(cfg: ScanConfig, rows: int, dim: int, mapper) -> dict[str, int]:
    """Bytes (float32) that the options ask a scan of `rows` rows of `dim` to allocate at once, by option: the
    streamed chunks (image, caption, mapped and staged copies and the mapper's activations), the --mapper self
    sample, the --mapper knn bank with one query block's similarities and neighbours."""
    from ..mapper import KNN_GATHER_BYTES

    chunk = min(cfg.chunk_rows, rows)
    need = {"chunk_rows": 8 * chunk * dim * 4}
    if mapper == "self":
        need["self_sample"] = 4 * min(cfg.self_sample, rows) * dim * 4
    if mapper == "knn":
        bank = min(cfg.knn_bank, rows)
        k = max(1, min(cfg.knn_neighbours, bank - 1))
        block = max(1, min(2048, KNN_GATHER_BYTES // (k * dim * 4)))
        need["knn_bank"] = 2 * bank * dim * 4 + block * bank * 4
        need["knn_neighbours"] = block * k * (dim * 4 + 8)
    return need


def check_memory(cfg: ScanConfig, rows: int, dim: int, mapper, free_bytes: int) -> None:
    """Refuse, before allocating, options whose memory is more than the `free_bytes` free (0: unknown, not
    checked), naming the option that asks for the most."""
    need = memory_needed(cfg, rows, dim, mapper)
    total = sum(need.values())
    if free_bytes <= 0 or total <= free_bytes:
        return
    name = max(need, key=need.get)
    raise InputError(f"{option_name(name)} {getattr(cfg, name):,}: the scan would allocate about "
                     f"{total / 2**30:.1f} GiB at once ({rows:,} rows of dim {dim}), more than the "
                     f"{free_bytes / 2**30:.1f} GiB free on {cfg.device}: lower it")
