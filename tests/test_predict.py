"""predict.py end to end on the generated target dataset: the tiny FDSL checkpoint of conftest (trained on
datasets[0]) and the training-free knn scoring photos of datasets[1] (candle, wood_board) against
their normal references. The first test is the README's demo command on test-sized data."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import predict
from conftest import load_test_script
from utils.config import TestConfig
from utils.metrics import auroc

REPO = Path(__file__).resolve().parents[1]
WINDOWS = ["--winmode", "mul", "--win-size", "8", "--win-stride", "2"]  # as demo.sh tests
KNN = ["--method", "knn", "--backbone", "tiny_clip"]


def run_predict(capsys, *args) -> tuple[int, str]:
    rc = predict.main([str(a) for a in args])
    return rc, capsys.readouterr().err


def error_line(rc: int, err: str) -> str:
    """The one line a refused run prints: exit 2, no traceback."""
    lines = [line for line in err.strip().splitlines() if line.strip() and "predict:" not in line]  # tqdm's bar
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("predict.py: error: "), err
    return lines[0]


def summary(out: Path) -> dict:
    return json.loads((out / "predictions.json").read_text())


def is_bad(row: dict) -> bool:
    return "/good/" not in row["image"] and "good" not in Path(row["image"]).stem


@pytest.fixture(scope="module")
def threshold_run(datasets, trained, tmp_path_factory) -> Path:
    """A finished test.py run of the checkpoint on the target dataset: where thresholds come from."""
    cfg = TestConfig(data_root=str(datasets[1]), dataset="target", checkpoint=str(trained),
                     results_root=str(tmp_path_factory.mktemp("results")), model_name="fdsl_tiny", k_shot=4, seed=0,
                     winmode="mul", win_size=8, win_stride=2)
    return load_test_script().evaluate(cfg)


@pytest.fixture(scope="module")
def odd_sizes(datasets, tmp_path_factory) -> dict[str, Path]:
    """A defective and a normal candle photo resized to non-square sizes (the overlay must keep them)."""
    folder = tmp_path_factory.mktemp("odd")
    out = {}
    for name, src, wh in (("wide_bad", "candle/test/blob/001.png", (150, 96)),
                          ("tall_good", "candle/test/good/000.png", (80, 120))):
        with Image.open(datasets[1] / src) as im:
            im.convert("RGB").resize(wh, Image.BICUBIC).save(folder / f"{name}.png")
        out[name] = folder / f"{name}.png"
    return out


def test_readme_demo_command_on_generated_data(datasets, trained, threshold_run, odd_sizes, tmp_path, capsys):
    root, out = datasets[1], tmp_path / "pred"
    rc, err = run_predict(capsys, "--checkpoint", trained, "--refs", root / "candle/train/good",
                          "--images", f"{root}/candle/test/*/*.png", *odd_sizes.values(), "--out", out,
                          "--threshold-from", threshold_run, "--category", "candle", *WINDOWS, "--batch-size", 5)
    assert rc == 0, err
    s = summary(out)
    rows = s["predictions"]
    assert len(rows) == 12 + 2 and s["counts"] == {"queries": 14, "scored": 14, "skipped": 0,
                                                   "anomalous": sum(r["anomalous"] for r in rows)}
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)

    # the threshold is the category's, read from the run's metrics.json; fdsl's image threshold is not used
    metrics = json.loads((threshold_run / "metrics.json").read_text())["per_category"]
    t = s["threshold"]
    assert t["pixel"] == metrics["candle"]["p_f1_threshold"] != metrics["wood_board"]["p_f1_threshold"]
    assert t["image"] is None and t["category"] == "candle" and t["warnings"] == []
    assert t["source"] == str(threshold_run / "metrics.json") and "map_max" in t["anomalous_rule"]
    assert s["colour_scale"]["vcenter"] == t["pixel"]
    assert s["method"] == "fdsl" and len(s["references"]) == 4 and s["inference"]["winmode"] == "mul"

    # one overlay and one mask per query, at the query's own size; the mask is the map at the threshold
    for r in rows:
        with Image.open(r["image"]) as im:
            size = im.size
        assert (r["width"], r["height"]) == size
        with Image.open(out / r["overlay"]) as ov, Image.open(out / r["mask"]) as mk:
            assert ov.size == size and ov.mode == "RGB" and mk.size == size and mk.mode == "L"
            mask = np.asarray(mk)
        assert set(np.unique(mask)) <= {0, 255}
        assert mask.any() == r["anomalous"] == (r["map_max"] >= t["pixel"])
    assert len(list(out.glob("*_overlay.png"))) == len(list(out.glob("*_mask.png"))) == 14
    names = {Path(r["image"]).relative_to(root).as_posix(): r["overlay"] for r in rows if "candle" in r["image"]}
    assert names["candle/test/good/000.png"] == "good_000_overlay.png"  # repeated stems keep their folder
    assert names["candle/test/blob/000.png"] == "blob_000_overlay.png"
    assert names["candle/test/good/003.png"] == "good_003_overlay.png"  # one naming rule for the whole run

    # the ranking: defective photos above normal ones
    labels = [is_bad(r) for r in rows]
    scores = [r["score"] for r in rows]
    print(f"\nimage AUROC of predict.py scores (candle, tiny checkpoint): {auroc(labels, scores):.3f}")
    assert auroc(labels, scores) > 0.8
    assert np.mean([r["score"] for r in rows if is_bad(r)]) > np.mean([r["score"] for r in rows if not is_bad(r)])

    with open(out / "predictions.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert {"image", "score", "map_max", "anomalous", "overlay", "mask"} <= set(table[0])
    assert [row["image"] for row in table] == [r["image"] for r in rows]
    assert float(table[0]["score"]) == rows[0]["score"]


def test_threshold_from_picks_the_category_and_checks_the_method(datasets, trained, threshold_run, tmp_path,
                                                                  capsys):
    base = ["--refs", datasets[1] / "candle/train/good/000.png", "--images", datasets[1] / "candle/test/good",
            "--out", tmp_path / "x", "--threshold-from", threshold_run]
    line = error_line(*run_predict(capsys, "--checkpoint", trained, *base))
    assert "--category" in line and "candle, wood_board" in line
    line = error_line(*run_predict(capsys, "--checkpoint", trained, *base, "--category", "tiles"))
    assert "'tiles'" in line and "candle, wood_board" in line
    line = error_line(*run_predict(capsys, *KNN, *base, "--category", "candle"))
    assert "method 'fdsl'" in line and "'knn'" in line
    assert not (tmp_path / "x").exists()  # refused before any work
    rc, err = run_predict(capsys, "--checkpoint", trained, *base, "--category", "wood_board")
    wood = json.loads((threshold_run / "metrics.json").read_text())["per_category"]["wood_board"]
    assert rc == 0 and summary(tmp_path / "x")["threshold"]["pixel"] == wood["p_f1_threshold"]
    assert "k_shot" in err  # 1 reference here, 4 in the run: the maps' scale may differ, and it is said


def _results_run(folder: Path, thresholds: dict, method: str = "knn", config: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"per_category": {"candle": thresholds}}))
    if config:
        (folder / "config.json").write_text(json.dumps({"method": {"method": method},
                                                        "test": {"winmode": "nan", "k_shot": 2}}))
    return folder


def test_knn_uses_the_image_threshold_on_its_own_scores(datasets, tmp_path, capsys):
    run = _results_run(tmp_path / "run", {"p_f1_threshold": 0.35, "i_f1_threshold": 0.4})
    out = tmp_path / "out"
    rc, err = run_predict(capsys, *KNN, "--refs", *sorted((datasets[1] / "candle/train/good").glob("*.png"))[:2],
                          "--images", f"{datasets[1]}/candle/test/*/00[01].png", "--out", out, "--threshold-from", run)
    assert rc == 0, err
    s = summary(out)
    assert (s["threshold"]["pixel"], s["threshold"]["image"]) == (0.35, 0.4) and s["threshold"]["warnings"] == []
    for r in s["predictions"]:
        assert r["anomalous"] == (r["score"] >= 0.4)
    assert any(r["anomalous"] for r in s["predictions"]) and not all(r["anomalous"] for r in s["predictions"])


def test_a_run_with_other_settings_or_no_config_warns(datasets, tmp_path, capsys):
    run = _results_run(tmp_path / "run", {"p_f1_threshold": 0.35, "i_f1_threshold": 0.4}, config=False)
    rc, err = run_predict(capsys, *KNN, "--refs", datasets[1] / "candle/train/good/000.png", "--images",
                          datasets[1] / "candle/test/good/000.png", "--out", tmp_path / "o", "--threshold-from", run)
    assert rc == 0 and "could not be checked" in err
    run2 = _results_run(tmp_path / "run2", {"p_f1_threshold": 0.35, "i_f1_threshold": 0.4})
    rc, err = run_predict(capsys, *KNN, "--refs", datasets[1] / "candle/train/good/000.png", "--images",
                          datasets[1] / "candle/test/good/000.png", "--out", tmp_path / "o2", "--threshold-from", run2,
                          *WINDOWS)
    assert rc == 0 and "k_shot" in err and "winmode" in err
    assert "winmode" in summary(tmp_path / "o2")["threshold"]["warnings"][0]


def test_unreadable_query_is_skipped_and_listed(datasets, tmp_path, capsys):
    queries = tmp_path / "q"
    queries.mkdir()
    for name in ("000", "001"):
        (queries / f"{name}.png").write_bytes((datasets[1] / f"candle/test/good/{name}.png").read_bytes())
    (queries / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "out"
    rc, err = run_predict(capsys, *KNN, "--refs", datasets[1] / "candle/train/good/000.png", "--images", queries,
                          "--out", out)
    assert rc == 0 and "skipped" in err and "broken.png" in err
    s = summary(out)
    assert s["counts"]["scored"] == 2 and [k["image"] for k in s["skipped"]] == [str(queries / "broken.png")]
    assert "cannot read image" in s["skipped"][0]["reason"]
    assert sorted(p.name for p in out.glob("*.png")) == ["000_overlay.png", "001_overlay.png"]
    line = error_line(*run_predict(capsys, *KNN, "--refs", datasets[1] / "candle/train/good/000.png", "--images",
                                   queries / "broken.png", "--out", tmp_path / "none"))
    assert "none of the 1 query image(s)" in line and "broken.png" in line


def test_batching_does_not_change_results_and_reruns_drop_stale_masks(datasets, odd_sizes, tmp_path, capsys):
    images = [f"{datasets[1]}/wood_board/test/*/000.png", *odd_sizes.values()]
    # one reference: without --threshold no threshold at all (2 or more would give a leave-one-out one)
    common = [*KNN, "--refs", datasets[1] / "wood_board/train/good/000.png", "--images", *images]
    out1, out5 = tmp_path / "b1", tmp_path / "b5"
    assert run_predict(capsys, *common, "--out", out1, "--batch-size", 1, "--threshold", 0.3)[0] == 0
    assert run_predict(capsys, *common, "--out", out5, "--batch-size", 5)[0] == 0
    one, five = summary(out1)["predictions"], summary(out5)["predictions"]
    assert [r["image"] for r in one] == [r["image"] for r in five]
    np.testing.assert_allclose([r["score"] for r in one], [r["score"] for r in five], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([r["map_max"] for r in one], [r["map_max"] for r in five], rtol=1e-5, atol=1e-6)
    # no threshold: no masks, no anomalous column, the fixed [0, 1] colour scale
    s = summary(out5)
    assert "anomalous" not in s["predictions"][0] and s["threshold"]["pixel"] is None
    assert (s["colour_scale"]["vmin"], s["colour_scale"]["vmax"], s["colour_scale"]["vcenter"]) == (0.0, 1.0, None)
    assert not list(out5.glob("*_mask.png"))
    with open(out5 / "predictions.csv") as f:
        assert f.readline().strip() == "image,score,map_max,width,height,overlay"
    # the same folder again without a threshold: the first run's masks go
    assert list(out1.glob("*_mask.png"))
    assert run_predict(capsys, *common, "--out", out1)[0] == 0
    assert not list(out1.glob("*_mask.png")) and len(list(out1.glob("*_overlay.png"))) == len(one)


def test_precision_is_recorded_resolved_and_bf16_stays_close(datasets, tmp_path, capsys):
    """--precision: 'auto' is fp32 on CPU and recorded as such; bf16 autocast of the backbone moves
    the scores by little (the bound of tests/models/test_precision.py); fp16 on CPU is refused."""
    common = [*KNN, "--refs", datasets[1] / "candle/train/good", "--images", f"{datasets[1]}/candle/test/*/00[0-2].png"]
    assert run_predict(capsys, *common, "--out", tmp_path / "auto")[0] == 0
    assert run_predict(capsys, *common, "--out", tmp_path / "bf16", "--precision", "bf16")[0] == 0
    auto, bf16 = summary(tmp_path / "auto"), summary(tmp_path / "bf16")
    assert auto["inference"]["precision"] == "fp32" and bf16["inference"]["precision"] == "bf16"
    a, b = ({r["image"]: r["score"] for r in s["predictions"]} for s in (auto, bf16))
    assert a.keys() == b.keys()
    diff = np.abs(np.array([a[k] for k in a]) - np.array([b[k] for k in a]))
    assert diff.max() < 0.01 and diff.max() > 0  # bf16 really ran, and stayed close
    line = error_line(*run_predict(capsys, *common, "--out", tmp_path / "fp16", "--precision", "fp16"))
    assert "fp16" in line and "CPU" in line


@pytest.mark.parametrize("case, expected", [
    ("empty_refs", "no reference image in folder"),
    ("no_match", "no query image matched"),
    ("missing_query", "query image or folder not found"),
    ("threshold_text", "--threshold must be a number, got 'abc'"),
    ("threshold_nan", "--threshold must be a finite number, got 'nan'"),
    ("threshold_null", "['p_f1_threshold'] must be a number, got None"),
    ("other_method", "holds a checkpoint of method 'fdsl', but method 'knn' was asked for"),
    ("other_backbone", "was trained with backbone tiny_clip"),
    ("not_a_checkpoint", "cannot read checkpoint"),
    ("untrained", "method 'fdsl' must be trained first"),
    ("both_thresholds", "exclude each other"),
])
def test_bad_input_is_one_line_naming_it(case, expected, datasets, trained, tmp_path, capsys):
    refs = datasets[1] / "candle/train/good"
    images = datasets[1] / "candle/test/good"
    source = ["--checkpoint", trained]
    extra: list = []
    if case == "empty_refs":
        refs = tmp_path / "empty"
        refs.mkdir()
        (refs / "notes.txt").write_text("not an image")
    elif case == "no_match":
        images = f"{tmp_path}/*.png"
    elif case == "missing_query":
        images = tmp_path / "nope.png"
    elif case == "threshold_text":
        extra = ["--threshold", "abc"]
    elif case == "threshold_nan":
        extra = ["--threshold", "nan"]
    elif case == "threshold_null":
        extra = ["--threshold-from", _results_run(tmp_path / "run", {"p_f1_threshold": None}, method="fdsl")]
    elif case == "other_method":
        source += ["--method", "knn"]
    elif case == "other_backbone":
        source += ["--backbone", "tiny_cnn"]
    elif case == "not_a_checkpoint":
        source = ["--checkpoint", datasets[1] / "candle/test/good/000.png"]
    elif case == "untrained":
        source = ["--method", "fdsl", "--backbone", "tiny_clip"]
    else:
        extra = ["--threshold", "0.5", "--threshold-from", tmp_path]
    line = error_line(*run_predict(capsys, *source, "--refs", refs, "--images", images, "--out", tmp_path / "out",
                                   *extra))
    assert expected in line, line
    named = {"empty_refs": refs, "no_match": images, "missing_query": images, "threshold_null": "metrics.json",
             "not_a_checkpoint": "000.png"}.get(case)
    assert named is None or str(named) in line
    assert not (tmp_path / "out").exists()


def test_command_line_exit_code_and_one_line(tmp_path):
    res = subprocess.run([sys.executable, "predict.py", *KNN, "--refs", str(tmp_path), "--images", str(tmp_path),
                          "--out", str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [f"predict.py: error: no reference image in folder {tmp_path} (any "
                                               f"format Pillow opens: .png, .jpg, .bmp, .tif, ...)"]


def test_subspacead_scores_photos_of_any_size_whatever_the_batch(datasets, odd_sizes, tmp_path, capsys):
    """The training-free subspacead through predict.py: references fitted once (with their rotated
    copies), photos of their own sizes scored alike in batches of 1 and of 5."""
    common = ["--method", "subspacead", "--backbone", "tiny_dinov2", "--image-size", 56, "--param", "augment_count=3",
              "--refs", datasets[1] / "candle/train/good/000.png",
              "--images", f"{datasets[1]}/candle/test/*/000.png", *odd_sizes.values()]
    out1, out5 = tmp_path / "b1", tmp_path / "b5"
    assert run_predict(capsys, *common, "--out", out1, "--batch-size", 1)[0] == 0
    assert run_predict(capsys, *common, "--out", out5, "--batch-size", 5)[0] == 0
    one, five = summary(out1), summary(out5)
    assert one["method"] == "subspacead" and len(one["predictions"]) == len(five["predictions"]) >= 4
    assert "--param 'augment': expected KEY=VALUE" in error_line(*run_predict(capsys, *common, "--param", "augment", "--out", out5))
    np.testing.assert_allclose([r["score"] for r in one["predictions"]], [r["score"] for r in five["predictions"]],
                               rtol=1e-4, atol=1e-6)
    for r in one["predictions"]:
        with Image.open(out1 / Path(r["overlay"]).name) as im:
            assert im.size == (r["width"], r["height"])  # the map at the photo's own size
