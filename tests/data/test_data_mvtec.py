"""MVTec-layout indexer: schema, category discovery, errors, CLI, and the real sample slice."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.meta import DatasetError, counts, summarise, validate_meta, write_meta
from data.mvtec import MVTEC_CATEGORIES, build_meta
from utils.io import read_json

REPO = Path(__file__).resolve().parents[2]
SAMPLE = Path(os.environ.get("FSAD_SAMPLE_DATA", REPO.parent / "shared" / "data" / "mvtec_bottle_xs"))


def _img(path: Path, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((8, 8, 3) if mode == "RGB" else (8, 8), np.uint8)
    if mode == "L":  # masks: one defect pixel, since empty masks are refused
        arr[3, 4] = 255
    Image.fromarray(arr).save(path)


def _category(root: Path, name: str, defects=("crack",), mask_ext=".png") -> None:
    c = root / name
    _img(c / "train" / "good" / "001.png")
    _img(c / "train" / "good" / "000.PNG")  # extensions are case-insensitive
    (c / "train" / "good" / "notes.txt").write_text("not an image")
    _img(c / "train" / "good" / ".hidden.png")
    _img(c / "test" / "good" / "000.png")
    for d in defects:
        _img(c / "test" / d / "000.png")
        _img(c / "test" / d / "001.jpg")
        _img(c / "ground_truth" / d / "000_mask.png", "L")
        _img(c / "ground_truth" / d / f"001_mask{mask_ext}", "L")


@pytest.fixture
def root(tmp_path):
    _category(tmp_path, "widget", ("crack", "dent"))
    _category(tmp_path, "gadget")
    (tmp_path / "not_a_category" / "stuff").mkdir(parents=True)
    return tmp_path


def test_schema_order_and_counts(root):
    meta = build_meta(root)
    validate_meta(meta, root)
    assert list(meta["train"]) == ["gadget", "widget"]  # no official name: every layout folder
    assert counts(meta)["test"] == {"gadget": (1, 2), "widget": (1, 4)}
    train = [it["img_path"] for it in meta["train"]["widget"]]
    assert train == ["widget/train/good/000.PNG", "widget/train/good/001.png"]
    bad = [it for it in meta["test"]["widget"] if it["anomaly"]]
    assert [(it["specie_name"], it["mask_path"]) for it in bad] == [
        ("crack", "widget/ground_truth/crack/000_mask.png"), ("crack", "widget/ground_truth/crack/001_mask.png"),
        ("dent", "widget/ground_truth/dent/000_mask.png"), ("dent", "widget/ground_truth/dent/001_mask.png")]
    good = [it for it in meta["test"]["widget"] if not it["anomaly"]]
    assert good == [{"img_path": "widget/test/good/000.png", "mask_path": "", "cls_name": "widget",
                     "specie_name": "good", "anomaly": 0}]


def test_official_categories_take_precedence_and_selection(root):
    _category(root, "bottle")
    assert "bottle" in MVTEC_CATEGORIES and list(build_meta(root)["train"]) == ["bottle"]
    assert list(build_meta(root, ["widget"])["test"]) == ["widget"]
    with pytest.raises(DatasetError, match="nope"):
        build_meta(root, ["nope"])


def test_missing_mask_names_the_path(root):
    (root / "widget" / "ground_truth" / "dent" / "001_mask.png").unlink()
    with pytest.raises(DatasetError) as e:
        build_meta(root)
    assert str(root / "widget" / "ground_truth" / "dent" / "001_mask.png") in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_or_empty_root(tmp_path):
    with pytest.raises(DatasetError) as e:
        build_meta(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(e.value) and "train/good" in str(e.value)
    with pytest.raises(DatasetError, match="no category folders"):
        build_meta(tmp_path)


def test_write_meta_is_sorted_and_summarised(root):
    path, summary = write_meta(root, build_meta(root))
    assert path == root / "meta.json" and read_json(path) == build_meta(root)
    assert not list(root.glob(".meta.json.*"))  # no temp file left behind
    assert summary == summarise(read_json(path)) and "widget" in summary


def test_cli_as_script_and_module(root, tmp_path):
    res = subprocess.run([sys.executable, "data/mvtec.py", "--root", str(root)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "gadget" in res.stdout and (root / "meta.json").is_file()
    (root / "gadget" / "ground_truth" / "crack" / "000_mask.png").unlink()
    res = subprocess.run([sys.executable, "-m", "data.mvtec", "--root", str(root)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "000_mask.png" in lines[0]


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"sample data not found at {SAMPLE}")
def test_real_bottle_sample(tmp_path):
    root = shutil.copytree(SAMPLE, tmp_path / "mvtec")  # the shared folder is read-only
    write_meta(root, build_meta(root))
    meta = read_json(root / "meta.json")
    validate_meta(meta, root)
    assert counts(meta) == {"train": {"bottle": (5, 0)}, "test": {"bottle": (5, 5)}}
    bad = [it for it in meta["test"]["bottle"] if it["anomaly"]]
    assert {it["specie_name"] for it in bad} == {"broken_large"} and all(it["mask_path"] for it in bad)
