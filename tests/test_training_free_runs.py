"""anomalydino and knn's ingredients through test.py's evaluation: what a results folder records,
--param, and the reuse check."""
import json

import pytest

from conftest import load_test_script
from utils.config import TestConfig


def run(datasets, tmp_path, method, params=None, name=None):
    cfg = TestConfig(data_root=str(datasets[1]), dataset="target", method=method, backbone="tiny_dinov2",
                     image_size=112, results_root=str(tmp_path), model_name=name or method, k_shot=1, seed=0,
                     eval_size=64, params=params or {})
    return load_test_script().evaluate(cfg), cfg


def test_anomalydino_run_records_its_ingredients(datasets, tmp_path):
    run_dir, cfg = run(datasets, tmp_path, "anomalydino")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method"]["method"] == "anomalydino" and config["method"]["masking"] == "categories"
    assert config["test"]["params"] == {} and config["checkpoint_epoch"] is None
    info = json.loads((run_dir / "metrics.json").read_text())["categories"]
    knn_dir, _ = run(datasets, tmp_path, "knn")
    knn_info = json.loads((knn_dir / "metrics.json").read_text())["categories"]
    for cls in ("candle", "wood_board"):
        assert info[cls]["peak_memory_mib"] > 0 and info[cls]["seconds_per_image"] > 0
        # eight rotations of the one reference: a bank eight times knn's
        assert info[cls]["bank_bytes"] == 8 * knn_info[cls]["bank_bytes"]
        assert knn_info[cls]["foreground_masked"] is False
    # candles are in anomalydino's list of masked categories, wood boards are not
    assert info["candle"]["foreground_masked"] is True and info["wood_board"]["foreground_masked"] is False
    # the same folder with other parameters is another configuration: refused, not overwritten
    with pytest.raises(ValueError, match="differs in params"):
        load_test_script().evaluate(TestConfig(**{**cfg.__dict__, "params": {"top_percent": 5.0}}))


def test_param_reaches_the_method_and_names_its_folder_settings(datasets, tmp_path):
    run_dir, _ = run(datasets, tmp_path, "knn", {"top_percent": 1.0, "masking": "on"}, name="knn-top1p")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["test"]["params"] == {"top_percent": 1.0, "masking": "on"}
    assert config["method"]["top_percent"] == 1.0 and config["method"]["masking"] == "on"
    with pytest.raises(ValueError, match="no parameter"):
        run(datasets, tmp_path, "knn", {"top_procent": 1.0}, name="typo")


def test_param_parsing_and_checkpoints_refuse_parameters():
    cfg, _ = load_test_script().parse_args(["--data-root", "d", "--method", "knn", "--param", "top_percent=1",
                                            "--param", "rotations=[0,90]", "--param", "masking=on"])
    assert cfg.params == {"top_percent": 1, "rotations": [0, 90], "masking": "on"}
    with pytest.raises(ValueError, match="training-free methods only"):  # test.py, before any folder is written
        load_test_script().results_dir(TestConfig(data_root="d", checkpoint="epoch_5.pth", params={"use_nam": False}))


def test_predict_masks_by_the_category_it_is_told(datasets, tmp_path, monkeypatch):
    import predict

    states = []
    fit = predict.fit_references
    monkeypatch.setattr(predict, "fit_references", lambda *args: states.append(fit(*args)) or states[-1])
    base = ["--method", "anomalydino", "--backbone", "tiny_dinov2", "--param", "mask_threshold=4",
            "--refs", str(datasets[1] / "candle/train/good/000.png"), "--images", str(datasets[1] / "candle/test/good")]
    assert predict.main([*base, "--out", str(tmp_path / "a"), "--category", "candle"]) == 0
    assert predict.main([*base, "--out", str(tmp_path / "b"), "--category", "bottle"]) == 0
    assert predict.main([*base, "--out", str(tmp_path / "c")]) == 0
    # candles are masked (anomalydino's list), bottles are not, and without a category nothing is
    assert [s.masked for s in states] == [True, False, False]
    a = json.loads((tmp_path / "a" / "predictions.json").read_text())
    assert a["method"] == "anomalydino" and a["category"] == "candle" and a["method_parameters"] == {"mask_threshold": 4}
    # background patches score 0: never above the unmasked score
    by_image = {r["image"]: r["map_max"] for r in json.loads((tmp_path / "b" / "predictions.json").read_text())["predictions"]}
    assert all(r["map_max"] <= by_image[r["image"]] + 1e-6 for r in a["predictions"])


def test_calibrate_reports_rates_at_thresholds_chosen_without_labels(datasets, tmp_path):
    """test.py --calibrate N: N normal train photos that are not references set the thresholds (the same
    rule as predict.py --calibrate); the run reports the false-positive rate on test/good and the recall
    on defective photos at them, beside the F1-max threshold's, and they are what the numbers say."""
    import numpy as np
    import torch

    from data.dataset import load_image, load_meta
    from methods import create_method, resolve_method_config
    from utils.config import MethodConfig

    root = datasets[1]
    cfg = TestConfig(data_root=str(root), dataset="target", method="knn", backbone="tiny_clip",
                     results_root=str(tmp_path), k_shot=2, seed=0, eval_size=64, calibrate=2, classes=["candle"])
    run_dir = load_test_script().evaluate(cfg)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    m, info = metrics["per_category"]["candle"], metrics["categories"]["candle"]
    cal = info["calibration"]
    train = {it["img_path"] for it in load_meta(root)["train"]["candle"]}
    assert cal["source"] == "calibration" and cal["n_photos"] == 2 and set(cal["photos"]) <= train
    assert not set(cal["photos"]) & set(info["references"])  # never a reference
    assert "calibrated on 2 normal train photos" in (run_dir / "table.md").read_text()

    # recomputed outside test.py: the references' state, the calibration photos' and test photos' scores
    torch.manual_seed(0)
    method = create_method(resolve_method_config(MethodConfig(name="knn", backbone="tiny_clip")))
    size = method.image_size
    state = method.fit(torch.stack([load_image(root / p, size) for p in info["references"]]), info["references"])
    _, normal_scores = method.predict(torch.stack([load_image(root / p, size) for p in cal["photos"]]), state, (64, 64))
    assert m["calib_i_threshold"] == pytest.approx(float(normal_scores.max()), rel=1e-5)
    items = load_meta(root)["test"]["candle"]
    _, scores = method.predict(torch.stack([load_image(root / it["img_path"], size) for it in items]), state, (64, 64))
    labels = np.array([it["anomaly"] for it in items], bool)
    flagged = scores.numpy() >= m["calib_i_threshold"]
    assert m["calib_i_fpr"] == pytest.approx(flagged[~labels].mean())
    assert m["calib_i_recall"] == pytest.approx(flagged[labels].mean())
    assert 0 < m["calib_i_recall"] and m["calib_i_fpr"] < 1
    for key in ("i_f1_fpr", "i_f1_recall", "calib_p_fpr", "calib_p_recall", "calib_p_threshold"):
        assert 0 <= m[key] <= 1 or key == "calib_p_threshold", key

    # more calibration photos than the train split holds besides the references: refused before any work
    with pytest.raises(ValueError, match="--calibrate 3 needs 3 normal train images of category 'candle'"):
        load_test_script().evaluate(TestConfig(**{**cfg.__dict__, "calibrate": 3, "model_name": "more"}))
    # a finished run without calibration is another configuration
    with pytest.raises(ValueError, match="differs in calibrate"):
        load_test_script().evaluate(TestConfig(**{**cfg.__dict__, "calibrate": 0}))
