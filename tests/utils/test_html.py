"""The page functions of utils/html.py on hand-made data: escaping, links, order, flags, the generic
threshold and row fields, and which comparison cells are marked best. The pages in a real browser:
tests/test_html_pages.py."""
from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser

from utils.html import comparison_page, href, predictions_page, run_page, text

EVIL = '<script>alert("x")</script> & "quoted" #1 %20.png'


class Collect(HTMLParser):
    """Tags with their attributes, and the text, as a browser's parser sees them."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag, **attrs):
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def _summary(rows, threshold=None):
    return {"method": "knn", "checkpoint": None, "references": ["refs/000.png"], "predictions": rows,
            "threshold": threshold if threshold is not None else {"pixel": 0.5, "image": 0.4, "source": "given",
                                                                  "anomalous_rule": "score >= 0.4"},
            "counts": {"queries": len(rows), "scored": len(rows)}, "skipped": []}


def _row(name, score, anomalous=None, **extra):
    row = {"image": name, "score": score, "map_max": score + 0.01, "width": 10, "height": 8,
           "overlay": f"{name}_overlay.png", "mask": f"{name}_mask.png", **extra}
    if anomalous is not None:
        row["anomalous"] = anomalous
    return row


def test_href_percent_encodes_and_escapes():
    assert href("a b/c#1?.png") == "a%20b/c%231%3F.png"
    assert href('x"<y>.png') == "x%22%3Cy%3E.png"
    assert href("../../photos/1.png") == "../../photos/1.png"
    assert href("javascript:alert(1)") == "javascript%3Aalert%281%29"  # never a scheme: always a relative file
    assert text('<a href="x">&') == "&lt;a href=&quot;x&quot;&gt;&amp;"


def test_predictions_page_escapes_every_file_name_and_value():
    html = predictions_page(_summary([_row(EVIL, 0.9, True, note=EVIL)], {"source": EVIL, "pixel": 0.5}),
                            [f"../photos/{EVIL}"])
    assert "<script>" not in html and "alert(\"x\")" not in html
    parsed = Collect(html)
    assert not parsed.all("script")
    # the browser's parser reads the names back unchanged, and each link is the encoded file name
    assert sum(EVIL in t for t in parsed.text) >= 3  # the photo cell, the extra column, the threshold
    srcs = {a["src"] for a in parsed.all("img")}
    assert href(f"{EVIL}_overlay.png").replace("&amp;", "&") in srcs
    assert href(f"../photos/{EVIL}").replace("&amp;", "&") in srcs


def test_predictions_page_rows_sorted_flagged_and_linked():
    rows = [_row("low", 0.1, False), _row("high", 0.9, True), _row("mid", 0.5, True)]
    originals = ["../in/low.png", "../in/high.png", "../in/mid.tif"]
    parsed = Collect(predictions_page(_summary(rows), originals))
    photo_rows = [a for t, a in parsed.tags if t == "tr" and "photo" in a.get("class", "")]
    assert [a["id"] for a in photo_rows] == ["r1", "r2", "r3"]
    assert [a["class"] for a in photo_rows] == ["photo flagged", "photo flagged", "photo"]
    thumbs = [a["src"] for a in parsed.all("img", **{"class": "thumb"})]
    assert thumbs == ["high_overlay.png", "mid_overlay.png", "low_overlay.png"]  # highest score first
    # each thumbnail opens its own full-size view holding overlay, mask and original
    views = [a["id"] for t, a in parsed.tags if t == "section"]
    assert views == ["v1", "v2", "v3"]
    imgs = [a["src"] for a in parsed.all("img")]
    assert "../in/high.png" in imgs and "high_mask.png" in imgs
    assert "../in/mid.tif" not in imgs and {"href": "../in/mid.tif"} in parsed.all("a")  # TIFF: a link only
    assert parsed.all("input", id="flagged-only", type="checkbox")
    assert "flagged only (2 of 3)" in "".join(parsed.text)


def test_predictions_page_shows_any_threshold_fields_and_row_fields():
    """Whatever a run records about its threshold (a calibration source, a rule, nested details) and
    any new per-photo field is shown, without the page knowing the names."""
    threshold = {"pixel": 0.3, "source": "calibration", "rule": "references, leave-one-out",
                 "calibration": {"quantile": 0.99, "n": 12}, "warnings": []}
    page = predictions_page(_summary([_row("a", 0.2, False, p_value=0.031)], threshold), [None])
    body = " ".join(Collect(page).text)
    for shown in ("calibration", "references, leave-one-out", "quantile", "0.99", "p_value", "0.031"):
        assert shown in body, shown


def test_predictions_page_without_threshold_has_no_filter_and_no_flag_column():
    rows = [{k: v for k, v in _row("a", 0.2).items() if k != "mask"}]
    parsed = Collect(predictions_page(_summary(rows, {}), [None]))
    assert not parsed.all("input")
    assert "No threshold" in "".join(parsed.text)
    assert "flag" not in [t.strip() for t in parsed.text]


def test_predictions_page_needs_one_original_per_row():
    import pytest

    with pytest.raises(ValueError, match="2 paths for 1 predictions"):
        predictions_page(_summary([_row("a", 0.2)]), [None, None])


COLUMNS = (("i_auroc", "i-AUROC"), ("p_auroc", "p-AUROC"))


def test_run_page_metrics_curves_panels_and_config():
    metrics = {"per_category": {"candle": {"i_auroc": 0.875, "p_auroc": None, "p_f1_threshold": 0.25}},
               "mean": {"i_auroc": 0.875, "p_auroc": math.nan}, "excluded": {"p_auroc": ["candle"]},
               "categories": {"candle": {"n_test": 16, "references": ["a.png"]}}}
    curves = {"candle": {"roc": "curves/candle_roc.png", "pr": "curves/candle_pr.png"}}
    panels = {"candle": [{"panel": "images/candle/good_000.png", "image": "candle/test/good/000.png",
                          "label": "normal", "score": 0.7},
                         {"panel": "images/candle/crack_001.png", "image": "candle/test/crack/001.png",
                          "label": "anomalous", "score": 0.1}]}
    page = run_page("m | d | 1shot | seed0", {"test": {"seed": 0, "note": EVIL}}, metrics, COLUMNS, curves, panels)
    parsed = Collect(page)
    cells = [t.strip() for t in parsed.text if t.strip()]
    assert cells[cells.index("candle"):cells.index("candle") + 3] == ["candle", "87.5", "n/a"]
    assert "mean" in cells and "p_f1_threshold" in cells and "n_test" in cells
    assert [a["src"] for a in parsed.all("img")] == ["curves/candle_roc.png", "curves/candle_pr.png",
                                                     "images/candle/good_000.png", "images/candle/crack_001.png"]
    assert "normal images scored highest" in cells and "anomalous images scored lowest" in cells
    assert "<script>" not in page and json.dumps(EVIL) in "".join(parsed.text)  # the configuration, escaped


def test_run_page_without_pictures_says_how_to_get_them():
    page = run_page("t", {}, {"per_category": {"c": {"i_auroc": 0.5}}, "mean": {"i_auroc": 0.5}}, COLUMNS)
    assert "--save-images" in page and "<img" not in page


def _cmp_row(shots, ds, model, **means):
    return {"shots": shots, "dataset": ds, "model": model, "seeds": 1, "facts": {"method": model},
            "cells": {k: (f"{100 * v:.1f}" if not math.isnan(v) else "n/a", 100 * v) for k, v in means.items()},
            "reports": [("seed0", f"../{model}/{ds}/{shots}shot/seed0/report.html")]}


def _best_cells(page: str) -> list[tuple[str, str, str]]:
    """(model, dataset, value) of every cell marked best."""
    out = []
    for tr in re.findall(r'<tr class="model">(.*?)</tr>', page):
        tds = re.findall(r"<td[^>]*>(.*?)</td>", tr)
        out += [(tds[2], tds[1], v) for v in re.findall(r'<td class="num best">(.*?)</td>', tr)]
    return out


def test_comparison_marks_the_best_mean_per_column_within_shots_and_dataset():
    rows = [_cmp_row(1, "visa", "fdsl", i_auroc=0.90, p_auroc=0.80),
            _cmp_row(1, "visa", "knn", i_auroc=0.85, p_auroc=0.80),  # a tie: both marked
            _cmp_row(1, "mvtec", "fdsl", i_auroc=0.70, p_auroc=math.nan),
            _cmp_row(1, "mvtec", "knn", i_auroc=0.75, p_auroc=0.60),  # NaN is never best
            _cmp_row(2, "visa", "fdsl", i_auroc=0.10, p_auroc=0.10)]  # alone in its group: nothing to mark
    page = comparison_page(rows, COLUMNS, "note")
    assert sorted(_best_cells(page)) == sorted([("fdsl", "visa", "90.0"), ("fdsl", "visa", "80.0"),
                                                ("knn", "visa", "80.0"), ("knn", "mvtec", "75.0"),
                                                ("knn", "mvtec", "60.0")])
    parsed = Collect(page)
    assert len([a for t, a in parsed.tags if t == "tr" and a.get("class") == "model"]) == 5
    assert {"href": "../knn/mvtec/1shot/seed0/report.html"} in parsed.all("a")
