"""Detection quality against ground truth: TPR, FPR, precision, AUROC, AUPRC, TPR at a fixed FPR, FPR at full TPR.

AUROC and AUPRC are scikit-learn's (roc_auc_score, average_precision_score: ties count half, thresholds at the
distinct scores) in numpy, so a scan needs no scikit-learn; the tests hold them to scikit-learn's values.
"""
from __future__ import annotations

import numpy as np


def auroc(labels: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (the Mann-Whitney statistic with average ranks); NaN when one class is absent."""
    labels = np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        return float("nan")
    ranks = _average_ranks(np.asarray(score, dtype=np.float64))
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auprc(labels: np.ndarray, score: np.ndarray) -> float:
    """Average precision (the step-wise area under the precision-recall curve); NaN without positives."""
    labels = np.asarray(labels, dtype=bool)
    if not labels.any():
        return float("nan")
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="mergesort")
    ranked, hits = np.asarray(score, dtype=np.float64)[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]  # the last row of each distinct score
    tps = np.cumsum(hits)[last].astype(np.float64)
    precision = tps / (last + 1)
    recall_step = np.diff(np.r_[0.0, tps]) / tps[-1]
    return float(np.sum(recall_step * precision))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (scipy.stats.rankdata's "average")."""
    order = np.argsort(x, kind="mergesort")
    ranked = x[order]
    starts = np.r_[0, np.flatnonzero(np.diff(ranked)) + 1]
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def tpr_at_fpr(labels: np.ndarray, score: np.ndarray, fpr: float) -> float:
    """TPR when the threshold is the smallest that keeps the false-positive rate at or below `fpr`."""
    labels = np.asarray(labels, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    neg = np.sort(score[~labels])[::-1]
    pos = score[labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    allowed = int(np.floor(fpr * len(neg)))  # number of negatives we may flag
    # flag score > t; choose t = the (allowed+1)-th largest negative score
    t = neg[allowed] if allowed < len(neg) else -np.inf
    return float(np.mean(pos > t))


def fpr_at_full_tpr(labels: np.ndarray, score: np.ndarray) -> float:
    """FPR when the threshold is the lowest poisoned row's score (every poisoned row flagged, ties flagged too)."""
    labels = np.asarray(labels, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    if not labels.any() or labels.all():
        return float("nan")
    return float(np.mean(score[~labels] >= score[labels].min()))


def detection_metrics(labels: np.ndarray, flagged: np.ndarray, score: np.ndarray,
                      fpr_points: tuple[float, ...] = (0.001, 0.01)) -> dict:
    """Verdict and ranking metrics. Rows with a NaN score rank lowest (never count as caught by the ranking)."""
    labels = np.asarray(labels, dtype=bool)
    flagged = np.asarray(flagged, dtype=bool)
    score = np.where(np.isfinite(score), score, -np.inf).astype(np.float64)
    score = np.where(np.isfinite(score), score, np.min(score[np.isfinite(score)], initial=0.0) - 1.0)
    tp = int(np.sum(flagged & labels))
    fp = int(np.sum(flagged & ~labels))
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    out = {
        "positives": n_pos,
        "negatives": n_neg,
        "flagged": int(flagged.sum()),
        "true_positives": tp,
        "false_positives": fp,
        "tpr": tp / n_pos if n_pos else float("nan"),
        "fpr": fp / n_neg if n_neg else float("nan"),
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "auroc": auroc(labels, score),
        "auprc": auprc(labels, score),
    }
    for f in fpr_points:
        out[f"tpr_at_fpr_{f:g}"] = tpr_at_fpr(labels, score, f)
    out["fpr_at_tpr_1"] = fpr_at_full_tpr(labels, score)
    return out
