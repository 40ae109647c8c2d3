"""Ranking metrics of detect/metrics.py on hand-checked inputs: FPR at full TPR, TPR at a fixed FPR."""
import numpy as np

from cfbd_fast.detect.metrics import detection_metrics, fpr_at_full_tpr, tpr_at_fpr


def test_fpr_at_full_tpr_counts_negatives_at_or_above_the_lowest_positive():
    labels = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0], dtype=bool)
    score = np.array([0.9, 0.5, 0.95, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -1.0])
    assert fpr_at_full_tpr(labels, score) == 2 / 8  # 0.95 above, 0.5 tied with the lowest positive
    assert fpr_at_full_tpr(labels, -score) == 7 / 8
    assert fpr_at_full_tpr(labels, np.where(labels, 2.0, score)) == 0.0
    assert np.isnan(fpr_at_full_tpr(np.zeros(4, dtype=bool), np.arange(4.0)))


def test_detection_metrics_reports_it_beside_tpr_at_fpr():
    rng = np.random.default_rng(0)
    labels = np.zeros(2000, dtype=bool)
    labels[:20] = True
    score = rng.normal(size=2000) + 3.0 * labels
    m = detection_metrics(labels, score > 2.0, score)
    worst = score[labels].min()
    assert m["fpr_at_tpr_1"] == np.mean(score[~labels] >= worst) > 0
    assert m["tpr_at_fpr_0.001"] == tpr_at_fpr(labels, score, 0.001)
