"""`bash demo.sh` writes the three pages, and they open in Chromium without an error and with every
picture (knn without windows: the fastest method, the same scripts and pages as fdsl)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.browser import NO_BROWSER, Browser, find_browser

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_writes_pages_that_open_in_chromium(tmp_path):
    results = tmp_path / "results"
    env = {**os.environ, "PYTHON": sys.executable, "METHOD": "knn", "DEMO_WINMODE": "nan",
           "DEMO_DATA": str(tmp_path / "generated"), "RESULTS_ROOT": str(results)}
    for key in ("FSAD_BACKBONE", "FDSL_BACKBONE", "FSAD_SAVE_IMAGES", "FDSL_SAVE_IMAGES"):
        env.pop(key, None)
    done = subprocess.run(["bash", str(REPO / "demo.sh")], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = sorted(results.glob("demo_knn_nan/*/1shot/seed0/report.html"))
    index, comparison = results / "predict_demo_knn" / "index.html", results / "summary" / "comparison.html"
    assert len(reports) == 2 and index.is_file() and comparison.is_file()
    if find_browser() is None:
        pytest.skip(NO_BROWSER)
    n_photos = len(json.loads((index.parent / "predictions.json").read_text())["predictions"])
    with Browser() as browser:
        for page, rows, expected in [(index, "tr.photo", n_photos), (comparison, "tr.model", 2),
                                     *[(r, "table.metrics tbody tr", 4) for r in reports]]:  # 3 categories + mean
            r = browser.check(page, rows)
            assert not r.errors, (page, r.errors)
            assert not r.broken_images, (page, r.broken_images)
            assert r.count == expected, (page, r.count)
            if page != comparison:
                assert r.images, page
    assert n_photos == 16  # synth_visa's candle test photos


@pytest.mark.parametrize("method", sorted(__import__("methods").METHODS))
def test_demo_settings_of_every_method_pass_the_launchers_checks(tmp_path, method):
    """DEMO_DRY_RUN: demo.sh's per-method settings (backbone, epochs, window mode) go through launch.py's
    checks of the environment and print the plan, without generating data or running anything."""
    env = {**os.environ, "PYTHON": sys.executable, "METHOD": method, "DEMO_DRY_RUN": "1",
           "DEMO_DATA": str(tmp_path / "generated"), "RESULTS_ROOT": str(tmp_path / "results")}
    for key in [k for k in env if k.startswith(("FSAD_", "FDSL_"))]:
        env.pop(key)
    done = subprocess.run(["bash", str(REPO / "demo.sh")], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    assert [r[:2] for r in rows] == [["synth_mvtec", "synth_visa"], ["synth_visa", "synth_mvtec"]]
    assert all(f"demo_{method}" in r[3] for r in rows)
    assert not (tmp_path / "generated").exists() and not (tmp_path / "results").exists()
