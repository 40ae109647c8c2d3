"""The report's figures, drawn with matplotlib's Agg backend and returned as PNG data: URIs."""
from __future__ import annotations

import base64
import io
import math

import numpy as np

from ..errors import InputError
from .explain import nulls, score_thresholds
from .outputs import ScanOutputs

MARGINS = {"left": 0.11, "right": 0.98, "bottom": 0.15, "top": 0.91}  # fixed: a layout engine costs more than drawing
CLEAN, POISON, FLAGGED, BENIGN_REGION = "#4c72b0", "#c44e52", "#dd8452", "#55a868"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise InputError("the report needs matplotlib: pip install -r requirements.txt") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    _pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _normal_pdf(x: np.ndarray, mean: float, var: float) -> np.ndarray:
    return np.exp(-0.5 * (x - mean) ** 2 / var) / math.sqrt(2 * math.pi * var)


def _histogram_figure():
    """One histogram panel of the report's size and margins."""
    fig, ax = _pyplot().subplots(figsize=(6, 3.4))
    fig.subplots_adjust(**MARGINS)
    return fig, ax


def _histogram(ax, values: np.ndarray, groups: list, bins: np.ndarray) -> None:
    """Stacked histogram of the groups (mask, label, colour) on a log count axis."""
    data = [values[mask] for mask, _, _ in groups]
    ax.hist(data, bins=bins, stacked=True, color=[c for _, _, c in groups], label=[lab for _, lab, _ in groups])
    ax.set_yscale("log")
    ax.set_ylabel("rows")


def _groups(out: ScanOutputs, finite: np.ndarray) -> list:
    """Colour the rows by ground truth where it is known, else by verdict."""
    if out.labels is not None:
        return [(finite & ~out.labels, "clean", CLEAN), (finite & out.labels, "poisoned (ground truth)", POISON)]
    flagged = out.columns["verdict"] == "poisoned"
    return [(finite & ~flagged, "not flagged", CLEAN), (finite & flagged, "flagged", FLAGGED)]


def consistency_plot(out: ScanOutputs) -> str | None:
    """Histogram of c with the coarse stage's GMM components and its benign region (SafeCLIP: of s_o with its
    GMM; the cosine baseline, which computes no c: of s_o)."""
    gmm = out.summary.get("gmm")
    name = "s_o" if out.method in ("safeclip", "cosine") else "c"
    values = out.columns[name]
    finite = np.isfinite(values)
    if not finite.any():
        return None
    fig, ax = _histogram_figure()
    bins = np.linspace(values[finite].min(), values[finite].max(), 80)
    _histogram(ax, values, _groups(out, finite), bins)
    if gmm:
        x = np.linspace(bins[0], bins[-1], 600)
        width = bins[1] - bins[0]
        dens = [w * _normal_pdf(x, m, v) for w, m, v in zip(gmm["weights"], gmm["means"], gmm["variances"])]
        scale = int(finite.sum()) * width
        for k, d in enumerate(dens):
            ax.plot(x, np.maximum(d * scale, 1e-1), color="black", lw=1, ls="--" if k else "-",
                    label="GMM components" if k == 0 else None)
        # The benign region: the coarse stage's lowest-c component has posterior > gamma; SafeCLIP's safe
        # (highest-s_o) component has posterior >= 1 - its threshold on the score 1 - posterior.
        if "safe_component" in gmm:
            component, level = gmm["safe_component"], 1.0 - out.summary["threshold"]["value"]
        else:
            component, level = gmm.get("lowest_component"), out.summary["config"]["gamma"]
        if component is not None:
            posterior = dens[component] / np.maximum(np.sum(dens, axis=0), 1e-300)
            benign = posterior > level
            if benign.any():
                ax.axvspan(x[benign].min(), x[benign].max(), color=BENIGN_REGION, alpha=0.15,
                           label=f"benign region (posterior > {level:g})")
    ax.set_ylim(bottom=0.8)
    ax.set_xlabel("c = |s_g - s_o| (consistency)" if name == "c" else "s_o = cos(image, caption)")
    what = "SafeCLIP's GMM" if "safe_component" in (gmm or {}) else "GMM of the coarse stage" if gmm else \
        "distribution"
    ax.set_title(f"{name}: {what}", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    return _png(fig)


def score_plot(out: ScanOutputs) -> str | None:
    """Histogram of the verdict's score, the null it was tested against, and the cut(s)."""
    values = out.columns["score"]
    finite = np.isfinite(values)
    if not finite.any():
        return None
    fig, ax = _histogram_figure()
    lo, hi = np.percentile(values[finite], [0, 100])
    thresholds = {k: v for k, v in score_thresholds(out.summary).items() if np.isfinite(v)}
    hi = max([hi, *[v * 1.02 for v in thresholds.values()]])
    bins = np.linspace(lo, hi, 80)
    _histogram(ax, values, _groups(out, finite), bins)
    x = np.linspace(lo, hi, 600)
    n = int(finite.sum())
    for k, null in nulls(out.summary).items():
        ax.plot(x, np.maximum(n * (bins[1] - bins[0]) * _normal_pdf(x, null["location"], null["scale"] ** 2), 1e-1),
                color="black", lw=1, label="null" + (f" (cluster {k})" if k is not None else ""))
    for k, thr in thresholds.items():
        ax.axvline(thr, color=POISON, lw=1.2, ls=":",
                   label=f"cut {thr:.3g}" + (f" (cluster {k})" if k is not None else ""))
    ax.set_ylim(bottom=0.8)
    ax.set_xlabel(f"score ({out.summary.get('threshold', {}).get('score', out.method)})")
    ax.set_title("score, its null and the cut", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    return _png(fig)


def method_scores(out: ScanOutputs) -> dict:
    """Each method's ranking score present in this scan: higher means more suspicious."""
    cols = out.columns
    scores = {f"{out.method} score": cols["score"], "coarse (c)": cols["c"], "cosine (1 - s_o)": 1.0 - cols["s_o"]}
    if out.method in ("cosine", "coarse"):
        scores.pop(f"{out.method} score")
    return {name: s for name, s in scores.items() if np.isfinite(s[out.valid]).any()}


def _curves(truth: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rate, true-positive rate (recall) and precision at each distinct score, highest first."""
    order = np.argsort(-score, kind="mergesort")
    ranked, hits = score[order], truth[order]
    last = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]  # the last row of each distinct score
    tp = np.cumsum(hits)[last].astype(np.float64)
    fp = (last + 1) - tp
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]], np.r_[1.0, tp / (last + 1)]


def curves_plot(out: ScanOutputs) -> str | None:
    """ROC and precision-recall curves of each method's score against the labels, the areas in the legends (the
    scan's own AUROC and AUPRC, as in summary.json)."""
    from ..detect.metrics import auprc, auroc

    if out.labels is None:
        return None
    truth = out.labels[out.valid]
    if truth.all() or not truth.any():
        return None
    plt = _pyplot()
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(9, 3.6))
    fig.subplots_adjust(**MARGINS, wspace=0.25)
    for name, score in method_scores(out).items():
        s = score[out.valid]
        s = np.where(np.isfinite(s), s, np.min(s[np.isfinite(s)]) - 1)  # unscored rows rank last
        fpr, tpr, precision = _curves(truth, s)
        roc_ax.plot(fpr, tpr, label=f"{name} (AUROC {auroc(truth, s):.3f})")
        pr_ax.step(tpr, precision, where="pre", label=f"{name} (AUPRC {auprc(truth, s):.3f})")
    roc_ax.set_xscale("symlog", linthresh=1e-3)
    roc_ax.set(xlabel="false-positive rate (symlog)", ylabel="true-positive rate", title="ROC", ylim=(0, 1.02))
    pr_ax.set(xlabel="recall", ylabel="precision", title="precision-recall", ylim=(0, 1.02))
    for ax in (roc_ax, pr_ax):
        ax.legend(fontsize=7, loc="lower right" if ax is roc_ax else "lower left")
        ax.title.set_fontsize(10)
    return _png(fig)
