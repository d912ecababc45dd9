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
