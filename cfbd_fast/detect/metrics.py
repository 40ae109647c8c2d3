"""Detection quality against ground truth: TPR, FPR, precision, AUROC, AUPRC (scikit-learn), TPR at a fixed FPR."""
from __future__ import annotations

import numpy as np


def auroc(labels: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve; NaN when one class is absent."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(score, dtype=np.float64)))


def auprc(labels: np.ndarray, score: np.ndarray) -> float:
    """Average precision (the step-wise area under the precision-recall curve); NaN without positives."""
    from sklearn.metrics import average_precision_score

    labels = np.asarray(labels, dtype=bool)
    if not labels.any():
        return float("nan")
    return float(average_precision_score(labels, np.asarray(score, dtype=np.float64)))


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
    return out
