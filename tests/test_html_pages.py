"""The three HTML pages, written by the real scripts on a small generated dataset, opened in headless
Chromium: no console error, every picture loads, one row per photo (or per compared run), every
relative link points at a file that exists, the "flagged only" filter and the full-size views work.

Skips, naming what to install, only when no Chromium can be found (.ci/run installs it). Set
FSAD_SCREENSHOTS=DIR to keep a screenshot of each page there."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image

from tests.browser import NO_BROWSER, Browser, find_browser
from tests.conftest import load_test_script

ODD_NAME = 'a "b" <c> & #1 %20'  # every character a file name may hold that HTML or a URL treats specially


@pytest.fixture(scope="module")
def browser():
    if find_browser() is None:
        pytest.skip(NO_BROWSER)
    with Browser() as b:
        yield b


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """report.html of two knn runs (one with --save-images), their comparison.html, and index.html of
    predict.py over photos with awkward names (one a TIFF, which browsers do not show)."""
    import predict
    from data.synthetic import generate
    from utils import report

    root = tmp_path_factory.mktemp("pages")
    data = generate(root / "data", ("candle",), seed=5, size=64, n_train=2, n_test_good=3, n_test_bad=4)
    script = load_test_script()
    common = ["--data-root", str(data), "--dataset", "gen", "--results-root", str(root / "results"),
              "--method", "knn", "--backbone", "tiny_clip", "--eval-size", "32"]
    assert script.main(common + ["--save-images", "1"]) == 0  # no --model-name: results/knn
    assert script.main(common + ["--model-name", "knn_mul", "--winmode", "mul", "--win-size", "8",
                                 "--win-stride", "4"]) == 0
    run = root / "results" / "knn" / "gen" / "1shot" / "seed0"
    photos = root / "odd dir #2"
    photos.mkdir()
    tests = sorted((data / "candle" / "test").glob("*/*.png"))
    for i, src in enumerate(tests):
        shutil.copy(src, photos / f"{ODD_NAME} {i}.png")
    Image.open(tests[-1]).save(photos / f"{ODD_NAME} tiff.tif")
    out = root / "predicted"
    assert predict.main(["--method", "knn", "--backbone", "tiny_clip", "--refs", str(data / "candle/train/good"),
                         "--images", str(photos), "--out", str(out), "--threshold-from", str(run)]) == 0
    assert report.main(["aggregate", str(root / "results")]) == 0
    return {"index": out / "index.html", "report": run / "report.html",
            "plain_report": root / "results" / "knn_mul" / "gen" / "1shot" / "seed0" / "report.html",
            "comparison": root / "results" / "summary" / "comparison.html", "n_photos": len(tests) + 1, "run": run}


def _shot(name: str):
    folder = os.environ.get("FSAD_SCREENSHOTS")
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder) / f"{name}.png"


def _assert_clean(report, page: Path):
    assert not report.errors, report.errors
    assert report.images and not report.broken_images, report.broken_images
    files = [unquote(link) for link in report.links if not link.startswith("#")]
    missing = [f for f in files if not (page.parent / f).is_file()]
    assert files and not missing, missing


def test_the_browser_check_sees_errors_and_broken_pictures(browser, tmp_path):
    """The harness itself: a page with a console error, an exception and a missing picture."""
    Image.new("RGB", (4, 3), "red").save(tmp_path / "ok.png")
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><body><img src="ok.png"><img src="missing.png">'
                    "<script>console.error('boom'); undefined_function();</script></body></html>")
    r = browser.check(page)
    assert [i["width"] for i in r.images] == [4, 0] and r.broken_images == ["missing.png"]
    text = " ".join(r.errors)
    assert "boom" in text and "undefined_function" in text and "missing.png" in text


def test_predictions_page_in_chromium(browser, pages):
    r = browser.check(pages["index"], "tr.photo", _shot("index"))
    _assert_clean(r, pages["index"])
    summary = json.loads((pages["index"].parent / "predictions.json").read_text())
    assert r.count == len(summary["predictions"]) == pages["n_photos"]
    # overlay thumbnail + full-size overlay and mask for every photo, the original for the PNGs
    assert len(r.images) == 3 * pages["n_photos"] + pages["n_photos"] - 1
    flagged = sum(p["anomalous"] for p in summary["predictions"])
    assert 0 < flagged < pages["n_photos"]
    shown = browser.check(pages["index"], "tr.photo", expression="""(() => {
        const visible = () => [...document.querySelectorAll('tr.photo')].filter(r => r.offsetParent !== null).length;
        const box = document.getElementById('flagged-only');
        box.click(); const only = visible(); box.click();
        return [only, visible()];
    })()""")
    assert shown.value == [flagged, pages["n_photos"]]
    view = browser.check(pages["index"], fragment="v1", screenshot=_shot("index_view1"), expression="""(() =>
        [...document.querySelectorAll('section.view')].map(s => s.offsetParent !== null || getComputedStyle(s).display !== 'none'))()""")
    assert view.value == [True] + [False] * (pages["n_photos"] - 1)  # only the clicked photo's view is shown


def test_run_report_in_chromium(browser, pages):
    r = browser.check(pages["report"], "table.metrics tbody tr", _shot("report"))
    _assert_clean(r, pages["report"])
    metrics = json.loads((pages["run"] / "metrics.json").read_text())
    assert r.count == len(metrics["per_category"]) + 1  # and the mean
    panels = json.loads((pages["run"] / "images" / "candle" / "panels.json").read_text())
    assert len(panels) == 2  # --save-images 1: one normal, one anomalous
    srcs = [i["src"] for i in r.images]
    assert sorted(s for s in srcs if s.startswith("images/")) == sorted(p["panel"] for p in panels)
    assert sorted(s for s in srcs if s.startswith("curves/")) == [f"curves/candle_{k}.png" for k in ("pr", "pro", "roc")]
    plain = browser.check(pages["plain_report"])  # without --save-images: no pictures, no error
    assert not plain.errors and not plain.images


def test_comparison_in_chromium(browser, pages):
    r = browser.check(pages["comparison"], "tr.model", _shot("comparison"))
    assert not r.errors, r.errors
    assert r.count == 2  # knn and knn_mul on the one dataset
    reports = [unquote(link) for link in r.links]
    assert len(reports) == 2 and all((pages["comparison"].parent / f).resolve().is_file() for f in reports)
    assert {(pages["comparison"].parent / f).resolve() for f in reports} == \
        {pages["report"].resolve(), pages["plain_report"].resolve()}
