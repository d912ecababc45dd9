"""Static HTML pages of results, for a person to look at: one function per page, taking the plain
data the run also writes as JSON and returning the page's text.

Pages: `predictions_page` (predict.py's index.html), `run_page` (test.py's report.html) and
`comparison_page` (utils.report's comparison.html). Standard library only. Every value and file
name printed goes through `text`, every link through `href` (percent-encoded, then escaped); links
are relative to the page, styles inline, no script, nothing fetched from outside: a results folder
opens from disk, also when copied elsewhere whole. Fields a page does not know (added to the
JSON later) are still shown, generically, so a new field needs no change here.
"""
from __future__ import annotations

import json
import math
from html import escape
from pathlib import PurePath
from urllib.parse import quote

# Formats a browser shows in <img>; other photos (e.g. TIFF) get a link instead of a picture.
BROWSER_IMAGES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".avif")

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d1d1f;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.15em;margin:1.4em 0 .4em}h3{font-size:1em;margin:1em 0 .3em}
table{border-collapse:collapse;margin:.4em 0;background:#fff}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f3;white-space:nowrap}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tr.mean td{font-weight:600;background:#f6f6f9}td.best{background:#dff3df;font-weight:700}
table.kv th{width:12em;font-weight:500}
img.thumb{width:128px;height:auto;display:block;border:1px solid #ccc}
.yes{color:#b00020;font-weight:700}.no{color:#2e7d32}
figure{display:inline-block;margin:0 .8em .8em 0;vertical-align:top}
figure img{max-width:100%;border:1px solid #ccc}
figcaption{font-size:12px;color:#555;max-width:40em;word-break:break-all}
.curves img{width:360px;height:auto;margin-right:.5em}
pre{background:#fff;border:1px solid #ddd;padding:.6em;overflow:auto;max-height:40em}
.note{color:#555}.warn{color:#b00020}
#flagged-only:checked~table tr.photo:not(.flagged){display:none}
.view{display:none;position:fixed;inset:0;background:#141418;overflow:auto;padding:1em;z-index:1}
.view:target{display:block}.view a,.view p{color:#eee}.view figure{width:31%}
.view figure img{width:100%;height:auto;max-height:85vh;object-fit:contain;border:0}.view figcaption{color:#ccc}
"""


def text(value) -> str:
    """Any value as HTML text (quotes escaped too, so it is safe inside attributes)."""
    return escape(str(value), quote=True)


def href(path) -> str:
    """A relative link to a file: percent-encoded (spaces, '#', '?', '%' in file names) and escaped."""
    return escape(quote(PurePath(path).as_posix(), safe="/"), quote=True)


def number(value, digits: int = 4) -> str:
    """A number with `digits` significant digits; None and NaN as 'n/a'; anything else as text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "n/a" if value is None else text(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    return text(f"{value:.{digits}g}")


def percent(value) -> str:
    """A metric in [0, 1] as a percentage with one decimal, 'n/a' when undefined."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{100.0 * value:.1f}"


def value_html(value) -> str:
    """Any JSON value: objects as nested key/value tables, lists as lines, numbers formatted."""
    if isinstance(value, dict):
        return kv_table(value)
    if isinstance(value, (list, tuple)):
        return "<br>".join(value_html(v) for v in value) if value else "none"
    if value is None:
        return "none"
    if isinstance(value, float):
        return number(value, 6)
    return text(value)


def kv_table(data: dict, cls: str = "kv") -> str:
    rows = "".join(f"<tr><th>{text(k)}</th><td>{value_html(v)}</td></tr>" for k, v in data.items())
    return f'<table class="{cls}">{rows}</table>'


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{text(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")


def _img(src: str, alt: str, cls: str = "", lazy: bool = False) -> str:
    """An <img> linking to itself (click: the file at full size). Lazy pictures load when shown."""
    return (f'<a href="{href(src)}"><img src="{href(src)}" alt="{text(alt)}"'
            + (f' class="{cls}"' if cls else "") + (' loading="lazy"' if lazy else "") + "></a>")


def _json_block(title: str, data) -> str:
    return (f"<details><summary>{text(title)}</summary>"
            f"<pre>{text(json.dumps(data, indent=2, sort_keys=False, default=str))}</pre></details>")


# --------------------------------------------------------------------------- #
# predict.py: index.html
# --------------------------------------------------------------------------- #
# Row fields with a place of their own; any other field of predictions.json's rows gets a column.
_KNOWN_ROW_FIELDS = ("image", "score", "map_max", "anomalous", "width", "height", "overlay", "mask")


def predictions_page(summary: dict, originals: list[str | None] | None = None) -> str:
    """index.html of a predict.py run from the content of its predictions.json: every scored photo
    a row (highest score first) with the thumbnail of its overlay, its score and flag; a click on
    the thumbnail shows the overlay, mask and original at full size. `originals`: per row of
    summary["predictions"], the photo's path relative to the page (None: not linked)."""
    rows = list(summary.get("predictions") or [])
    originals = list(originals) if originals is not None else [None] * len(rows)
    if len(originals) != len(rows):
        raise ValueError(f"originals: {len(originals)} paths for {len(rows)} predictions")
    order = sorted(range(len(rows)), key=lambda i: (-float(rows[i].get("score", -math.inf)), str(rows[i].get("image"))))
    threshold = summary.get("threshold") if isinstance(summary.get("threshold"), dict) else {}
    flags = any("anomalous" in r for r in rows)
    extra = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in _KNOWN_ROW_FIELDS]
    counts = summary.get("counts") or {}

    head = ["#", "overlay", "photo", "score", "map max"] + (["flag"] if flags else []) + extra + ["size"]
    num_cols = {"#", "score", "map max"}
    body_rows, views = [], []
    for rank, i in enumerate(order, 1):
        r = rows[i]
        flagged = bool(r.get("anomalous"))
        name = str(r.get("image", ""))
        view = f"v{rank}"
        thumb = (f'<a href="#{view}"><img class="thumb" src="{href(r["overlay"])}" alt="overlay of {text(name)}" '
                 f'loading="lazy"></a>') if r.get("overlay") else "n/a"
        cells = [str(rank), thumb, text(name), number(r.get("score"), 6), number(r.get("map_max"), 6)]
        if flags:
            cells.append('<span class="yes">anomalous</span>' if flagged else
                         '<span class="no">normal</span>' if "anomalous" in r else "n/a")
        cells += [value_html(r.get(k)) for k in extra]
        cells.append(f"{text(r.get('width', '?'))}&times;{text(r.get('height', '?'))}")
        tds = "".join(f'<td class="num">{c}</td>' if h in num_cols else f"<td>{c}</td>" for h, c in zip(head, cells))
        body_rows.append(f'<tr class="photo{" flagged" if flagged else ""}" id="r{rank}">{tds}</tr>')
        figures = []
        for key, what in (("overlay", "overlay"), ("mask", "mask at the threshold")):
            if r.get(key):
                figures.append(f"<figure>{_img(r[key], f'{what} of {name}', lazy=True)}"
                               f"<figcaption>{text(what)}: {text(r[key])}</figcaption></figure>")
        original = originals[i]
        if original and PurePath(original).suffix.lower() in BROWSER_IMAGES:
            figures.append(f"<figure>{_img(original, f'original {name}', lazy=True)}"
                           f"<figcaption>original: {text(name)}</figcaption></figure>")
        elif original:
            figures.append(f'<p>original (a format browsers do not show): '
                           f'<a href="{href(original)}">{text(name)}</a></p>')
        views.append(f'<section class="view" id="{view}"><p><a href="#r{rank}">&larr; back to the list</a> &middot; '
                     f"#{rank} {text(name)} &middot; score {number(r.get('score'), 6)}</p>{''.join(figures)}</section>")

    th = "".join(f'<th class="num">{text(h)}</th>' if h in num_cols else f"<th>{text(h)}</th>" for h in head)
    n_flagged = sum(bool(r.get("anomalous")) for r in rows)
    if flags:
        control = (f'<input type="checkbox" id="flagged-only"> <label for="flagged-only">flagged only '
                   f"({n_flagged} of {len(rows)})</label>\n")
    else:
        control = ('<p class="note">No threshold: no photo is flagged (pass --calibrate NORMAL_PHOTOS, 2 or more '
                   'references, --threshold or --threshold-from).</p>\n')
    facts = {"method": summary.get("method"), "checkpoint": summary.get("checkpoint"),
             "checkpoint epoch": summary.get("checkpoint_epoch"), "photos": counts or len(rows),
             "references": summary.get("references"), "score": summary.get("score")}
    skipped = summary.get("skipped") or []
    skipped_html = ("<h2>Skipped photos</h2><ul>" + "".join(
        f"<li>{text(s.get('image'))}: {text(s.get('reason'))}</li>" for s in skipped) + "</ul>") if skipped else ""
    rest = {k: v for k, v in summary.items() if k not in ("predictions", "skipped")}
    body = (f"<h1>Predictions: {text(summary.get('method', ''))}, {len(rows)} photos</h1>\n"
            f"{kv_table({k: v for k, v in facts.items() if v is not None})}\n"
            f"<h2>Threshold</h2>\n{kv_table(threshold) if threshold else '<p>none</p>'}\n"
            f"<h2>Photos, highest score first</h2>\n"
            f'<p class="note">Click a thumbnail for the overlay, mask and original at full size.</p>\n'
            f'{control}<table class="photos"><thead><tr>{th}</tr></thead>\n<tbody>\n'
            + "\n".join(body_rows) + "\n</tbody></table>\n" + skipped_html
            + "\n" + "\n".join(views) + "\n<h2>Run</h2>\n" + _json_block("predictions.json without the rows", rest))
    return page(f"Predictions ({summary.get('method', '')})", body)


# --------------------------------------------------------------------------- #
# test.py: report.html
# --------------------------------------------------------------------------- #
def _panel_figure(p: dict) -> str:
    image = p.get("image", "")
    return (f"<figure>{_img(p['panel'], f'panel of {image}')}<figcaption>{text(image)}, score "
            f"{number(p.get('score'), 6)}</figcaption></figure>")


def run_page(title: str, config: dict, metrics: dict, columns, curves: dict | None = None,
             panels: dict | None = None) -> str:
    """report.html of one test.py run.

    metrics: metrics.json; columns: (key, header) of the metrics table, in %; curves: {category:
    {kind: relative path}}; panels: {category: [{"panel": relative path, "image", "label", "score"}]}
    (the most wrong images); config: config.json."""
    per_cat = metrics.get("per_category") or {}
    mean = metrics.get("mean") or {}
    keys = [k for k, _ in columns]
    head = "<th>category</th>" + "".join(f'<th class="num">{text(h)}</th>' for _, h in columns)
    rows = [f"<tr><td>{text(c)}</td>" + "".join(f'<td class="num">{percent(m.get(k))}</td>' for k in keys) + "</tr>"
            for c, m in per_cat.items()]
    rows.append('<tr class="mean"><td>mean</td>' + "".join(f'<td class="num">{percent(mean.get(k))}</td>'
                                                           for k in keys) + "</tr>")
    excluded = {k: v for k, v in (metrics.get("excluded") or {}).items() if v}
    note = ("<p class=\"note\">n/a: undefined; left out of the mean: " + "; ".join(
        f"{text(k)}: {text(', '.join(map(str, v)))}" for k, v in excluded.items()) + "</p>") if excluded else ""
    # per category: the other numbers of metrics.json (thresholds) and of its run info (sizes, timing)
    info = metrics.get("categories") or {}
    other = {c: {**{k: v for k, v in per_cat[c].items() if k not in keys},
                 **{k: v for k, v in (info.get(c) or {}).items() if not isinstance(v, (list, dict))}}
             for c in per_cat}
    other_keys = list(dict.fromkeys(k for v in other.values() for k in v))
    other_html = ""
    if other_keys:
        other_html = ("<h2>Thresholds and run details</h2><table><thead><tr><th>category</th>"
                      + "".join(f'<th class="num">{text(k)}</th>' for k in other_keys) + "</tr></thead><tbody>"
                      + "".join(f"<tr><td>{text(c)}</td>" + "".join(f'<td class="num">{number(v.get(k))}</td>'
                                                                     for k in other_keys) + "</tr>"
                                for c, v in other.items()) + "</tbody></table>")
    curves = curves or {}
    panels = panels or {}
    sections = []
    for c in per_cat:
        parts = []
        if curves.get(c):
            parts.append('<div class="curves">' + "".join(_img(p, f"{c} {kind} curve") for kind, p in curves[c].items())
                         + "</div>")
        for label, what in (("normal", "normal images scored highest"),
                            ("anomalous", "anomalous images scored lowest")):
            figs = [p for p in panels.get(c, []) if p.get("label") == label]
            if figs:
                parts.append(f"<h3>{text(what)}</h3>" + "".join(_panel_figure(p) for p in figs))
        if parts:
            sections.append(f'<h2 id="cat-{href(c)}">{text(c)}</h2>' + "".join(parts))
    pictures = "".join(sections) or ('<p class="note">No curves or panels: run test.py with --save-images N '
                                     "(launchers: FSAD_SAVE_IMAGES=N) to draw them.</p>")
    body = (f"<h1>{text(title)}</h1>\n<h2>Metrics (%)</h2>\n<table class=\"metrics\"><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>{note}\n{other_html}\n"
            f'<h2>Curves and the most wrong images</h2><p class="note">Panels: image | ground truth | heatmap | '
            f"mask at the pixel threshold.</p>\n{pictures}\n<h2>Configuration</h2>\n"
            f"{_json_block('config.json', config)}\n")
    return page(title, body)


# --------------------------------------------------------------------------- #
# utils.report aggregate: comparison.html
# --------------------------------------------------------------------------- #
def comparison_page(rows: list[dict], columns, note: str = "") -> str:
    """comparison.html: every model (method and setting) side by side.

    rows: dicts with "shots", "dataset", "model", "seeds" (count), "facts" ({name: value}, e.g. the
    method and backbone), "cells" ({key: (text, mean or NaN)}) and "reports" ([(label, relative
    link to a run's report.html)]); columns: (key, header). Within each (shots, dataset) group of
    two or more rows, the best mean of each column is marked (every table metric: higher is better;
    ties are all marked)."""
    fact_names = list(dict.fromkeys(k for r in rows for k in r.get("facts", {})))
    best: dict[tuple, float] = {}
    groups: dict[tuple, int] = {}
    for r in rows:
        g = (r["shots"], r["dataset"])
        groups[g] = groups.get(g, 0) + 1
        for key, _ in columns:
            v = r["cells"].get(key, ("", math.nan))[1]
            if isinstance(v, (int, float)) and math.isfinite(v):
                best[g + (key,)] = max(best.get(g + (key,), -math.inf), v)
    head = ("<th>shots</th><th>dataset</th><th>model</th>" + "".join(f"<th>{text(f)}</th>" for f in fact_names)
            + '<th class="num">seeds</th>' + "".join(f'<th class="num">{text(h)}</th>' for _, h in columns)
            + "<th>reports</th>")
    out = []
    for r in rows:
        g = (r["shots"], r["dataset"])
        cells = []
        for key, _ in columns:
            shown, v = r["cells"].get(key, ("n/a", math.nan))
            is_best = groups[g] > 1 and isinstance(v, (int, float)) and math.isfinite(v) and v == best.get(g + (key,))
            cells.append(f'<td class="num{" best" if is_best else ""}">{text(shown)}</td>')
        links = " ".join(f'<a href="{href(link)}">{text(label)}</a>' for label, link in r.get("reports", [])) or "none"
        out.append(f'<tr class="model"><td>{text(r["shots"])}</td><td>{text(r["dataset"])}</td>'
                   f'<td>{text(r["model"])}</td>'
                   + "".join(f"<td>{value_html(r.get('facts', {}).get(f))}</td>" for f in fact_names)
                   + f'<td class="num">{text(r["seeds"])}</td>' + "".join(cells) + f"<td>{links}</td></tr>")
    body = (f"<h1>All models side by side</h1>\n<p class=\"note\">{text(note)} Green: the best mean of a column "
            f"among the rows of the same shots and dataset, where there are several.</p>\n"
            f'<table class="comparison"><thead><tr>{head}</tr></thead><tbody>\n'
            + "\n".join(out) + "\n</tbody></table>\n")
    return page("Comparison of all models", body)
