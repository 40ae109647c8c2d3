"""The mapping network F of a scan: resolved from a file, fitted on the scanned rows, or a caption bank; and how
well it explains this data (measured on a random sample of valid rows)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..detect import seeds
from ..errors import InputError
from ..provenance import file_digest, text_digest
from .global_steps import GlobalSteps
from .options import ScanConfig
from .passes import Scores

NULL_SAMPLE = 2000  # random valid rows whose caption/image coherence is the "unrelated rows" reference
FIT_SAMPLE = 20_000  # random valid rows on which the mapper's fit and each cluster's grounding are measured


# -- the mapper --------------------------------------------------------------------------------------------------
def resolve_mapper(mapper, steps: GlobalSteps, cfg: ScanConfig, progress: bool):
    """A mapper object from a file path, "self", "knn" or an object with .map(); and its fingerprint.

    Self-fit and kNN mappers see only valid rows of a random sample of all rows, gathered to every process by the
    global steps (so ranks build the mapper one process builds).
    """
    from .. import mapper as mapper_mod

    source = steps.source
    name = str(mapper) if isinstance(mapper, (str, Path)) else None
    if name == "self":
        rows, (image, text) = steps.sample_rows(cfg.self_sample, cfg.random_seed, ("image", "text"))
        if len(rows) < 2:
            raise InputError(f"{source.path}: fewer than 2 valid rows to fit --mapper self on")
        m = mapper_mod.fit_self_mapper(image, text, sample=len(rows), seed=cfg.random_seed, device=cfg.device,
                                       progress=progress and steps.is_root, **source.embedding_model,
                                       **cfg.self_options)
        return m, "self:" + text_digest(m.config)
    if name == "knn":
        rows, (text,) = steps.sample_rows(cfg.knn_bank, cfg.random_seed, ("text",))
        if len(rows) < 2:
            raise InputError(f"{source.path}: fewer than 2 valid captions for the --mapper knn bank")
        m = mapper_mod.KnnMapper(text, rows, k=min(cfg.knn_neighbours, len(rows) - 1), **source.embedding_model)
        return m, "knn:" + text_digest(m.config)
    if name is not None:
        path = Path(mapper)
        m = mapper_mod.load_mapper(path, expect_model=source.identity["model"], expect_dim=source.dim)
        return m, "file:" + file_digest(path)
    return mapper, "object:" + text_digest(getattr(mapper, "config", {}))


def with_precision(mapper, cfg: ScanConfig):
    """The mapper with its matmuls in --mapper-precision (auto: fp16 on CUDA, fp32 on the CPU); mappers other
    than an MLP keep theirs."""
    import torch

    name = cfg.mapper_precision
    if name == "auto":
        name = "fp16" if cfg.device.startswith("cuda") else "fp32"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    return mapper.with_precision(dtype) if hasattr(mapper, "with_precision") else mapper


@dataclass
class Reference:
    """Random valid rows that stand for "unrelated pairs": caption/image coherence, the mapper's fit."""
    captions: np.ndarray
    images: np.ndarray
    caption_coherence: float
    image_coherence: float


def reference_sample(s: Scores, mapper, cfg: ScanConfig, steps: GlobalSteps) -> Reference:
    """A random sample of valid rows with F(I); records how much better F(I) predicts T than I does.

    Global: the sample is drawn from every valid row and its rows are fetched to every process.
    """
    import torch

    rows = steps.sample_valid(s.valid, FIT_SAMPLE, np.random.default_rng(cfg.random_seed))
    captions, images = steps.fetch("text", rows), steps.fetch("image", rows)
    with torch.no_grad():
        generated = mapper.map(torch.from_numpy(images).to(cfg.device), rows).float().cpu().numpy()
    t, i, g = (seeds.normalize_rows(x) for x in (captions, images, generated))
    by_mapper = float(np.median(np.sum(g * t, axis=1)))
    by_image = float(np.median(np.sum(i * t, axis=1)))
    by_mean = float(np.median(t @ seeds.normalize_rows(t.mean(axis=0, keepdims=True))[0]))
    fit = {"median_cos_generated_caption": by_mapper, "median_cos_image_caption": by_image,
           "median_cos_mean_caption": by_mean, "gain_over_mean_caption": by_mapper - by_mean, "rows": len(rows)}
    s.summary["mapper_fit"] = fit
    if by_mapper - by_mean < 0.02:
        s.warnings.append(f"the mapping network explains almost nothing: its captions F(I) match the real captions "
                          f"(median cosine {by_mapper:.3f}) no better than the average caption does ({by_mean:.3f}); "
                          "c then measures noise: train a mapper on clean pairs of this embedding model")
    null = slice(0, min(NULL_SAMPLE, len(rows)))
    return Reference(captions=captions, images=images,
                     caption_coherence=seeds.mean_pairwise_cosine(captions[null]),
                     image_coherence=seeds.mean_pairwise_cosine(images[null]))


