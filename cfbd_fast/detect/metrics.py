"""Detection quality against ground truth: TPR, FPR, precision, AUROC, AUPRC, TPR at a fixed FPR."""
from __future__ import annotations

import numpy as np


def _rank_average(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their average rank (as scipy.stats.rankdata(method='average'))."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    boundaries = np.flatnonzero(np.diff(xs)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(xs)]))
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auroc(labels: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie correction); NaN when one class is absent."""
    labels = np.asarray(labels, dtype=bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _rank_average(np.asarray(score, dtype=np.float64))
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auprc(labels: np.ndarray, score: np.ndarray) -> float:
    """Average precision (the step-wise area under the precision-recall curve, as scikit-learn defines it)."""
    labels = np.asarray(labels, dtype=bool)
    n_pos = int(labels.sum())
    if n_pos == 0:
        return float("nan")
    score = np.asarray(score, dtype=np.float64)
    order = np.argsort(-score, kind="stable")
    s, y = score[order], labels[order]
    # one point per distinct threshold: the last index of each run of equal scores
    last = np.concatenate((np.flatnonzero(np.diff(s)), [len(s) - 1]))
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / n_pos
    recall_prev = np.concatenate(([0.0], recall[:-1]))
    return float(np.sum((recall - recall_prev) * precision))


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


def detection_metrics(labels: np.ndarray, flagged: np.ndarray, score: np.ndarray,
                      fpr_points: tuple[float, ...] = (0.001, 0.01)) -> dict:
    """Verdict and ranking metrics. Rows with a NaN score rank lowest (never count as caught by the ranking)."""
    labels = np.asarray(labels, dtype=bool)
    flagged = np.asarray(flagged, dtype=bool)
    score = np.where(np.isfinite(score), score, -np.inf).astype(np.float64)
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
    return out
