"""bench/overlay_sheet.py: the docs' picture of predict.py runs, one section per run."""
import importlib.util
import json

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

spec = importlib.util.spec_from_file_location("overlay_sheet", REPO / "bench" / "overlay_sheet.py")
overlay_sheet = importlib.util.module_from_spec(spec)
spec.loader.exec_module(overlay_sheet)


def _run(folder, colours):
    folder.mkdir()
    rows = []
    for i, (kind, colour) in enumerate(colours):
        Image.new("RGB", (40 + 10 * i, 20), colour).save(folder / f"{i}_overlay.png")
        rows.append({"image": f"/data/test/{kind}/{i}.png", "score": 0.1 * i, "overlay": f"{i}_overlay.png",
                     "anomalous": kind != "good"})
    (folder / "predictions.json").write_text(json.dumps({
        "method": "knn", "references": ["r.png"], "predictions": rows,
        "threshold": {"source": "calibration", "image": 0.15, "calibration": {"photos": ["a.png", "b.png"]}}}))
    return folder


def test_sections_rows_and_sizes(tmp_path):
    a = _run(tmp_path / "a", [("good", (0, 0, 255)), ("crack", (255, 0, 0)), ("good", (0, 0, 250))])
    b = _run(tmp_path / "b", [("good", (0, 0, 255)), ("dent", (255, 0, 0))])
    out = tmp_path / "sheet.png"
    assert overlay_sheet.main([str(out), str(a), str(b), "--tile", "20", "--per-row", "2"]) == 0
    with Image.open(out) as im:
        sheet = np.asarray(im.convert("RGB"))
    section = 3 * overlay_sheet.HEADER + 2 * 20 + overlay_sheet.GAP
    assert sheet.shape[0] == 2 * section + 2 * overlay_sheet.GAP
    # first section: the normal row (blue tiles) above the defective row (red tile)
    top = overlay_sheet.HEADER * 2
    assert tuple(sheet[top + 5, 5]) == (0, 0, 255)
    assert tuple(sheet[top + 20 + overlay_sheet.GAP + overlay_sheet.HEADER + 5, 5]) == (255, 0, 0)
    assert sheet.shape[1] == 40 + 60 + overlay_sheet.GAP  # two normal tiles, 40 and 60 px wide at 20 px high


def test_a_run_without_defective_photos_is_refused(tmp_path):
    a = _run(tmp_path / "a", [("good", (0, 0, 255))])
    with pytest.raises(ValueError, match="defective"):
        overlay_sheet.main([str(tmp_path / "s.png"), str(a)])
