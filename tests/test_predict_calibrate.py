"""predict.py --calibrate and the leave-one-out thresholds, for every registered method on tiny
backbones and the generated target dataset (conftest's `datasets[1]`: candle, 4 normal train photos)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import predict
from methods import METHODS
from utils.visualize import ColourScale

# every registered method, on a tiny backbone: the arguments of a run ("fixture:NAME": a checkpoint fixture)
TINY = {
    "knn": ["--method", "knn", "--backbone", "tiny_clip"],
    "anomalydino": ["--method", "anomalydino", "--backbone", "tiny_dinov2", "--image-size", "112"],
    "subspacead": ["--method", "subspacead", "--backbone", "tiny_dinov2", "--image-size", "56",
                   "--param", "augment_count=3"],
    "fdsl": ["--checkpoint", "fixture:trained"],
    "dcpsfr": ["--checkpoint", "fixture:trained_dcpsfr"],
}


@pytest.fixture(scope="module")
def trained_dcpsfr(datasets, tmp_path_factory):
    """A DCP-SFR checkpoint on tiny CLIP and DINOv2, one short epoch: thresholds need a method, not a good one."""
    import train
    from utils.config import MethodConfig, TrainConfig

    cfg = TrainConfig(data_root=str(datasets[0]), dataset="aux", out_dir=str(tmp_path_factory.mktemp("dcpsfr")),
                      classes=["tiles"], method=MethodConfig(name="dcpsfr", backbone="clip=tiny_clip,dino=tiny_dinov2"),
                      epochs=1, batch_size=4, train_k_shot=2, seed=0)
    return train.train(cfg)


def method_args(name: str, request) -> list[str]:
    return [str(request.getfixturevalue(a.split(":", 1)[1])) if a.startswith("fixture:") else a for a in TINY[name]]


def run(capsys, *args) -> tuple[int, str, str]:
    rc = predict.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def summary(out: Path) -> dict:
    return json.loads((out / "predictions.json").read_text())


def candle(root: Path):
    good = sorted((root / "candle/train/good").glob("*.png"))
    return good[:2], good[2:], f"{root}/candle/test/*/*.png"


def test_every_registered_method_has_a_tiny_config():
    assert set(TINY) == set(METHODS)


@pytest.mark.parametrize("name", sorted(TINY))
def test_calibrate_works_for_every_method_under_bf16(name, datasets, request, tmp_path, capsys):
    refs, normal, queries = candle(datasets[1])
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, *method_args(name, request), "--refs", *refs, "--calibrate", *normal,
                          "--images", queries, "--out", out, "--precision", "bf16")
    assert rc == 0, err
    s = summary(out)
    t = s["threshold"]
    cal = t["calibration"]
    assert s["method"] == name and s["inference"]["precision"] == "bf16"
    assert t["source"] == "calibration" and cal["photos"] == [str(p) for p in normal] and cal["n_photos"] == 2
    assert "99.9th percentile" in cal["rule"] and "maximum" in t["anomalous_rule"]
    assert t["image"] == max(cal["normal_scores"]) and cal["floor"] < t["pixel"]
    # the colour scale: the median normal pixel at the bottom, the pixel threshold in the middle
    scale = s["colour_scale"]
    assert scale["vcenter"] == t["pixel"] and scale["vmin"] == pytest.approx(cal["floor"])
    assert scale["vmax"] == pytest.approx(2 * t["pixel"] - cal["floor"])
    rows = s["predictions"]
    assert all(r["anomalous"] == (r["score"] >= t["image"]) for r in rows)
    assert s["counts"]["anomalous"] == sum(r["anomalous"] for r in rows)
    with open(out / "predictions.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert "anomalous" in table[0] and [r["anomalous"] for r in table] == [str(r["anomalous"]) for r in rows]
    assert len(list(out.glob("*_mask.png"))) == len(rows) == 12
    assert f"{s['counts']['anomalous']} anomalous" in stdout and "calibration on 2 normal photo(s)" in stdout


def test_knn_calibration_is_the_normal_photos_scored_against_the_references(datasets, tmp_path, capsys):
    """The calibrated image threshold is the largest score of the calibration photos scored as queries
    against the same references; a version that fitted them into the references (scores about 0) or
    took the maximum over the queries (defective photos included) gives another number and fails."""
    refs, normal, queries = candle(datasets[1])
    knn = TINY["knn"]
    rc, stdout, err = run(capsys, *knn, "--refs", *refs, "--calibrate", *normal, "--images", queries,
                          "--out", tmp_path / "cal")
    assert rc == 0, err
    s = summary(tmp_path / "cal")
    rc, _, err = run(capsys, *knn, "--refs", *refs, "--images", *normal, "--out", tmp_path / "as_queries",
                     "--threshold", 1)
    assert rc == 0, err
    as_queries = summary(tmp_path / "as_queries")["predictions"]
    t = s["threshold"]
    assert t["image"] == pytest.approx(max(r["score"] for r in as_queries), rel=1e-5)
    assert t["pixel"] <= max(r["map_max"] for r in as_queries) * (1 + 1e-5)
    # defective photos are flagged more often than normal ones, and the best-separated ones all are
    rows = s["predictions"]
    bad = [r for r in rows if "/good/" not in r["image"]]
    good = [r for r in rows if "/good/" in r["image"]]
    assert np.mean([r["anomalous"] for r in bad]) > np.mean([r["anomalous"] for r in good])
    assert all(r["anomalous"] for r in bad if r["score"] > max(g["score"] for g in good))
    assert t["image"] < max(r["score"] for r in bad)
    # normal test photos are cold on the overlay scale (most pixels below the middle colour), defects warm
    scale = ColourScale(**{k: v for k, v in s["colour_scale"].items() if k != "alpha"})
    assert scale.normalise(t["pixel"] - 1e-9) < 0.5 < scale.normalise(max(r["map_max"] for r in bad))


def test_leave_one_out_without_calibration_photos_and_a_hint_with_one_reference(datasets, tmp_path, capsys):
    refs, normal, queries = candle(datasets[1])
    rc, stdout, err = run(capsys, *TINY["knn"], "--refs", *refs, *normal[:1], "--images", queries,
                          "--out", tmp_path / "loo")
    assert rc == 0, err
    s = summary(tmp_path / "loo")
    t = s["threshold"]
    assert t["source"] == "references, leave-one-out" and t["calibration"]["photos"] == [str(p) for p in
                                                                                       [*refs, normal[0]]]
    assert "leave-one-out" in stdout and "weaker than --calibrate" in stdout
    assert all(r["anomalous"] == (r["score"] >= t["image"]) for r in s["predictions"])
    assert min(t["calibration"]["normal_scores"]) > 0.01  # no reference was scored against itself

    rc, stdout, err = run(capsys, *TINY["knn"], "--refs", refs[0], "--images", queries, "--out", tmp_path / "one")
    assert rc == 0, err
    one = summary(tmp_path / "one")
    assert one["threshold"]["pixel"] is None and one["threshold"]["calibration"] is None
    assert "anomalous" not in one["predictions"][0] and "--calibrate NORMAL_PHOTOS" in stdout


def test_threshold_overrides_the_calibration_which_is_still_recorded(datasets, tmp_path, capsys):
    refs, normal, queries = candle(datasets[1])
    rc, _, err = run(capsys, *TINY["knn"], "--refs", *refs, "--calibrate", *normal, "--images", queries,
                     "--out", tmp_path / "o", "--threshold", 0.3)
    assert rc == 0, err
    t = summary(tmp_path / "o")["threshold"]
    assert (t["source"], t["pixel"], t["image"]) == ("given", 0.3, None)
    assert t["calibration"]["source"] == "calibration" and t["calibration"]["pixel"] != 0.3
    assert all(r["anomalous"] == (r["map_max"] >= 0.3) for r in summary(tmp_path / "o")["predictions"])
    assert summary(tmp_path / "o")["colour_scale"]["vcenter"] == 0.3


@pytest.mark.parametrize("case, expected", [
    ("reference", "is the reference"),
    ("copy_of_query", "has the same bytes as the query"),
    ("pixel_percentile", "--pixel-percentile must be a number in (0, 100], got 0.0"),
    ("image_percentile", "--image-percentile must be a number in (0, 100], got 150.0"),
    ("missing", "calibration image or folder not found"),
])
def test_bad_calibration_input_is_one_line_naming_it(case, expected, datasets, tmp_path, capsys):
    refs, normal, _ = candle(datasets[1])
    query = datasets[1] / "candle/test/good/000.png"
    calibrate, extra = list(normal), []
    if case == "reference":
        calibrate.append(refs[1])
    elif case == "copy_of_query":
        copy = tmp_path / "copy.png"
        copy.write_bytes(query.read_bytes())
        calibrate.append(copy)
    elif case == "pixel_percentile":
        extra = ["--pixel-percentile", "0"]
    elif case == "image_percentile":
        extra = ["--image-percentile", "150"]
    else:
        calibrate.append(tmp_path / "nope.png")
    rc, _, err = run(capsys, *TINY["knn"], "--refs", *refs, "--calibrate", *calibrate, "--images", query,
                     "--out", tmp_path / "out", *extra)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and expected in lines[0], err
    if case in ("reference", "copy_of_query", "missing"):
        assert str(calibrate[-1]) in lines[0]
    assert not (tmp_path / "out").exists()
