"""The report page: one self-contained HTML file (inline CSS, images as data: URIs, no script, nothing fetched)."""
from __future__ import annotations

import math
from collections import Counter
from html import escape

import numpy as np

from . import plots
from .explain import explain_rows, score_thresholds
from .outputs import ScanOutputs

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
main{max-width:1240px;margin:0 auto;padding:16px 24px}
h1{font-size:22px;margin:8px 0}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:18px 0 6px}
.verdict{padding:10px 14px;border-radius:6px;font-size:15px;margin:10px 0}
.verdict.bad{background:#fde8e8;border:1px solid #e0a0a0}.verdict.ok{background:#e6f4ea;border:1px solid #9ccc9c}
.note{background:#fff7e0;border:1px solid #e8d08a;padding:6px 10px;border-radius:4px;margin:6px 0;font-size:13px}
table{border-collapse:collapse;font-size:12.5px;margin:4px 0 10px}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}th{background:#f0f0f0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:flex;flex-wrap:wrap;gap:12px}.plot{border:1px solid #ddd;background:#fff;max-width:100%}
.thumbs{display:flex;flex-wrap:wrap;gap:6px}.thumbs figure{margin:0;width:100px;font-size:10.5px}
.thumbs figcaption{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
img.thumb{width:96px;height:96px;object-fit:contain;background:#eee;border:1px solid #ccc;display:block}
img.thumb.poison{border:2px solid #c44e52}img.thumb.small{width:64px;height:64px}
.cluster{background:#fff;border:1px solid #ddd;border-radius:6px;padding:4px 14px 10px;margin:10px 0}
.tag{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px;color:#fff;margin-left:6px}
.tag.backdoor{background:#c44e52}.tag.clean{background:#55a868}.tag.aside{background:#8c8c8c}
.bar{display:inline-block;height:9px;background:#4c72b0;vertical-align:middle}
.small{font-size:12px;color:#555}ol.seeds{margin:0;padding-left:16px;min-width:240px}
"""

CLUSTER_STATS = (("size", "seed-pool rows"), ("members", "member rows"),
                 ("inconsistent_share", "members inconsistent with their images"),
                 ("reference_share", "the same for the data's clusters"),
                 ("undescribed_share", "members whose image its caption does not describe"),
                 ("undescribed_base", "the same for the data's pairs"), ("p_value", "p-value"),
                 ("caption_coherence", "caption coherence"),
                 ("relative_caption_coherence", "relative caption coherence"),
                 ("relative_image_coherence", "relative image coherence"), ("median_c", "median c"),
                 ("grounding_linked", "best-matching images whose captions agree"),
                 ("one_caption_share", "share of its top caption"))


METRICS = {"positives": "poisoned rows", "flagged": "flagged", "true_positives": "true positives",
           "false_positives": "false positives", "tpr": "TPR (recall)", "fpr": "FPR", "precision": "precision",
           "auroc": "AUROC", "auprc": "AUPRC", "tpr_at_fpr_0.001": "TPR at FPR 0.001",
           "seed_precision": "seed precision"}


def _num(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, (int, np.integer)):
        return f"{x:,}"
    return f"{x:.{digits}g}"


def _table(header: list, rows: list, numeric: set = frozenset()) -> str:
    head = "<tr>" + "".join(f"<th>{escape(str(h))}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td class=num>{c}</td>" if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _img(uri: str, kind: str, alt: str, css: str = "") -> str:
    return f'<img class="{kind} {css}" data-kind="{kind}" src="{uri}" alt="{escape(alt)}" title="{escape(alt)}">'


def _thumbs(out: ScanOutputs, rows, limit: int) -> str:
    """Thumbnails of the rows' images (those that have a readable file), each with its key."""
    figures = []
    for row in list(rows)[:limit]:
        uri = out.thumbnail(row)
        if uri is None:
            continue
        caption = out.caption(row) or ""
        key = str(out.columns["key"][row])
        poison = "poison" if out.labels is not None and out.labels[row] else ""
        figures.append(f"<figure>{_img(uri, 'thumb', f'{key}: {caption}', poison)}"
                       f"<figcaption>{escape(key)}</figcaption></figure>")
    if not figures:
        return ""
    return f'<div class="thumbs">{"".join(figures)}</div>'


def page(out: ScanOutputs, max_rows: int = 100, thumbs_per_cluster: int = 16) -> str:
    s = out.summary
    tested, aside = _clusters(out, thumbs_per_cluster)
    sections = [_overview(out), _plots(out), tested, _flagged(out, max_rows), aside, _timings(s)]
    title = f"cfbd-fast report: {s['config']['method']} scan of {s['store'].get('path', '')}"
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>"
            f"<style>{CSS}</style></head><body><main><h1>{escape(title)}</h1>{''.join(sections)}</main>"
            "</body></html>\n")


def _overview(out: ScanOutputs) -> str:
    s = out.summary
    counts = s["counts"]
    flagged = counts["verdict"]["poisoned"]
    share = flagged / max(out.rows, 1)
    backdoors = [c for c in s.get("clusters", []) if c["backdoor"]]
    text = f"<b>{flagged:,}</b> of {out.rows:,} rows flagged as poisoned ({share:.3%})"
    if s["config"]["method"] == "cfbd":
        text += (f"; {len(backdoors)} backdoor cluster{'s' if len(backdoors) != 1 else ''}"
                 + (": " + ", ".join(escape(repr(c["caption"])) for c in backdoors) if backdoors else
                    f" among {len(s.get('clusters', []))} tested"))
    store = s["store"]
    cfg = s["config"]
    parts = [f'<div class="verdict {"bad" if flagged else "ok"}">{text}</div>']
    parts += [f'<div class="note">{escape(n)}</div>' for n in out.notes + s.get("warnings", [])]
    info = [("store", escape(str(store.get("path")))), ("rows × dim", f"{store['rows']:,} × {store['dim']}"),
            ("embedding model", escape(f"{store.get('model')} ({store.get('pretrained')})")),
            ("fingerprint", escape(str(store.get("fingerprint")))), ("mapper", escape(str(s.get("mapper")))),
            ("method", escape(cfg["method"])), ("threshold", escape(_cut_text(s))),
            ("scan time", f"{s['timings_s']['total']:.1f} s ({_num(s.get('rows_per_s'), 3)} rows/s) on "
                          f"{escape(str(s.get('device')))}"),
            ("labels", "store's is_poisoned column" if out.labels is not None and not cfg.get("labels") else
             escape(str(cfg.get("labels") or "none")))]
    parts.append(_table([], info))
    sub, ver = counts["subset"], counts["verdict"]
    parts.append("<h2>Counts</h2>")
    if cfg["method"] in ("cfbd", "cfbd-paper", "coarse"):  # the one-stage baselines have no coarse split
        parts.append(_table(["", *sub.keys()], [["coarse subset", *[_num(v) for v in sub.values()]]],
                            set(range(1, 5))))
    parts.append(_table(["", *ver.keys()], [["verdict", *[_num(v) for v in ver.values()]]], set(range(1, 4))))
    metrics = s.get("metrics")
    if metrics:
        keys = [k for k in METRICS if k in metrics]
        parts.append("<h3>Against the ground truth</h3>" + _table([METRICS[k] for k in keys],
                                                                    [[_num(metrics[k]) for k in keys]],
                                                                    set(range(len(keys)))))
    return "".join(parts)


def _cut_text(s: dict) -> str:
    thr = s.get("threshold", {})
    if "level" in thr:
        return f"{thr['method']} {thr['level']:g} on p-values (p-value cut {thr.get('p_cut', 0):.3g})"
    value = thr.get("value", s.get("config", {}).get("threshold"))  # a given cut may be recorded in the config only
    return f"{thr.get('method')}: {_num(value)} on {thr.get('score')}"


def _plots(out: ScanOutputs) -> str:
    name = {"safeclip": "s_o with SafeCLIP's GMM", "cosine": "s_o"}.get(
        out.method, "c with the GMM components and the benign region")
    figures = [(plots.consistency_plot(out), f"histogram of {name}"),
               (plots.score_plot(out), "histogram of the score with its null and the cut")]
    parts = ["<h2>Distributions</h2><div class=grid>"]
    parts += [_img(f, "plot", alt) for f, alt in figures if f]
    parts.append("</div>")
    curves = plots.curves_plot(out)
    if curves:
        parts.append("<h2>Ranking quality per method (ROC, precision-recall)</h2>"
                     + _img(curves, "plot", "ROC and precision-recall curves"))
        parts.append('<p class=small>Each curve ranks the valid rows by one score of this scan: the method\'s own, '
                     "the coarse consistency c, and the cosine baseline 1 - s_o.</p>")
    elif out.labels is None:
        parts.append('<p class=small>No ground truth (no is_poisoned column in the store and no --labels): '
                     "no ROC or precision-recall curves.</p>")
    return "".join(parts)


def _clusters(out: ScanOutputs, limit: int) -> tuple[str, str]:
    """The sections of the caption clusters tested (or of cfbd-paper's seed set) and of those set aside."""
    s = out.summary
    tested, aside = s.get("clusters"), s.get("clusters_set_aside", [])
    if tested is None:
        seeds = s.get("seeds", {}).get("rows", [])
        if not seeds:
            return "", ""
        return (f"<h2>Seed set</h2><p class=small>{len(seeds)} rows with the largest c: the paper's poisoned seed "
                f"set, whose captions every row's z is measured against.</p>" + _captions(out, seeds)
                + _thumbs(out, seeds, limit)), ""
    head = f"<h2>Caption clusters tested ({len(tested)})</h2>"
    if not tested:
        head += f"<p>{escape(s.get('cluster', {}).get('reason', 'no caption cluster'))}</p>"
    aside_head = (f"<h2>Caption clusters set aside ({len(aside)})</h2><p class=small>Clusters of the seed pool not "
                  "tested as backdoors, each with the reason.</p>") if aside else ""
    return (head + "".join(_cluster(out, entry, limit if entry["backdoor"] else limit // 2) for entry in tested),
            aside_head + "".join(_cluster(out, entry, limit // 2) for entry in aside))


def _cluster(out: ScanOutputs, entry: dict, limit: int) -> str:
    """One cluster: its verdict and reason, statistics, seed captions and images, and the rows flagged for it."""
    thresholds = score_thresholds(out.summary)
    flagged = out.columns["verdict"] == "poisoned"
    k = entry.get("cluster")
    tag = ("backdoor", "BACKDOOR") if entry["backdoor"] else \
        ("clean", "not a backdoor") if k is not None else ("aside", "set aside")
    head = f"Cluster {k}" if k is not None else "Cluster set aside"
    stats = [(label, _num(entry.get(key))) for key, label in CLUSTER_STATS if key in entry]
    if k is not None and k in thresholds:
        stats.append(("cut on the score", _num(thresholds[k])))
    parts = [f'<div class=cluster><h3>{head}: {escape(repr(entry["caption"]))}'
             f'<span class="tag {tag[0]}">{tag[1]}</span></h3><p>{escape(entry["reason"])}</p>'
             + _table([lab for lab, _ in stats], [[v for _, v in stats]], set(range(len(stats))))]
    seeds = entry.get("seed_rows", [])
    if seeds:
        parts.append(f"<p class=small>Its {len(seeds)} seed rows' captions:</p>" + _captions(out, seeds)
                     + _thumbs(out, seeds, limit))
    if k is not None:
        mine = np.flatnonzero(flagged & (out.columns["cluster"] == k))
        if len(mine):
            mine = mine[np.argsort(-out.columns["score"][mine], kind="stable")]
            thumbs = _thumbs(out, mine, limit)
            shown = f" (the images of the first {limit})" if thumbs and len(mine) > limit else ""
            parts.append(f"<p class=small>{len(mine):,} rows flagged for it{shown}; their captions:</p>"
                         + _captions(out, mine) + thumbs)
    parts.append("</div>")
    return "".join(parts)


def _captions(out: ScanOutputs, rows) -> str:
    captions = Counter(out.caption(r) for r in rows)
    if None in captions:
        return ""
    top = captions.most_common(8)
    more = len(captions) - len(top)
    return ("<table><tr><th>rows</th><th>caption</th></tr>"
            + "".join(f"<tr><td class=num>{n}</td><td>{escape(c)}</td></tr>" for c, n in top)
            + (f"<tr><td></td><td class=small>and {more} other captions</td></tr>" if more else "") + "</table>")


def _flagged(out: ScanOutputs, max_rows: int) -> str:
    rows = np.flatnonzero(out.columns["verdict"] == "poisoned")
    if not len(rows):
        return "<h2>Flagged rows</h2><p>None.</p>"
    p = np.nan_to_num(out.columns["p_value"][rows], nan=2.0)
    rows = rows[np.lexsort((-np.nan_to_num(out.columns["score"][rows], nan=-np.inf), p))]
    shown = [int(r) for r in rows[:max_rows]]
    explained = explain_rows(out, shown, neighbours=3)
    header = ["#", "image", "key", "caption", *(["label"] if out.labels is not None else []), "s_o", "s_g", "c",
              "subset", "cluster", "z", "score", "cut", "p-value", "nearest seed captions (cosine)"]
    table_rows = []
    for i, (row, e) in enumerate(zip(shown, explained)):
        uri = out.thumbnail(row, size=64)
        image = _img(uri, "thumb", str(e["key"]), "small") if uri else ""
        seeds = "".join(f"<li>{escape(str(n['caption']))} <span class=small>{n['cosine']:.3f}</span></li>"
                        for n in e["nearest_seeds"])
        table_rows.append([str(i + 1), image, escape(str(e["key"])), escape(e["caption"] or ""),
                           *([("poisoned" if e["label"] else "clean")] if out.labels is not None else []),
                           _num(e["s_o"]), _num(e["s_g"]), _num(e["c"]), e["subset"], _num(e["cluster"]),
                           _num(e["z"]), _num(e["score"]), _num(e["threshold"]), _num(e["p_value"], 3),
                           f"<ol class=seeds>{seeds}</ol>" if seeds else ""])
    numeric = {i for i, h in enumerate(header) if h in ("s_o", "s_g", "c", "z", "score", "cut", "p-value")}
    note = (f'<p class=note>{len(rows) - len(shown):,} more flagged rows are not shown: all are in flagged.csv, '
            f"and `cfbd-fast explain {escape(str(out.folder))} KEY` explains any row.</p>"
            if len(rows) > len(shown) else "")
    return (f"<h2>Flagged rows ({len(rows):,}; the most significant first)</h2>" + note
            + _table(header, table_rows, numeric))


def _timings(s: dict) -> str:
    t = s.get("timings_s", {})
    total = t.get("total") or 1.0
    rows = [[escape(k), f"{v:.3f}", f'<span class=bar style="width:{max(1, int(300 * v / total))}px"></span>']
            for k, v in t.items() if k != "total"]
    rows.append(["<b>total</b>", f"<b>{t.get('total', 0):.3f}</b>", ""])
    rate = s.get("rows_per_s")
    versions = ", ".join(f"{k} {v}" for k, v in s.get("versions", {}).items() if v)
    return ("<h2>Timings</h2>" + _table(["stage", "seconds", ""], rows, {1})
            + f"<p class=small>{_num(rate, 6) if rate else '–'} rows/s on {escape(str(s.get('device')))}, "
              f"{s.get('threads')} threads. {escape(versions)}</p>")
