"""anomalydino and knn's ingredients through test.py's evaluation: what a results folder records,
--param, and the reuse check."""
import json

import pytest

from conftest import load_test_script
from utils.config import TestConfig, validate_test


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
    with pytest.raises(ValueError, match="training-free methods only"):
        validate_test(TestConfig(data_root="d", checkpoint="epoch_5.pth", params={"use_nam": False}))


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
