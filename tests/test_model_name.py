"""test.py without --model-name names the results folder after the method (it once said `fdsl`
whatever the method was, so a knn run landed in results/fdsl/...)."""
from __future__ import annotations

import json

from tests.conftest import load_test_script
from utils.config import TestConfig


def test_default_model_name_follows_the_method():
    script = load_test_script()
    cfg, _ = script.parse_args(["--data-root", "d", "--method", "knn"])
    assert cfg.model_name == "" and script.model_name(cfg) == "knn"
    assert script.model_name(TestConfig(method="dcpsfr")) == "dcpsfr"
    assert script.model_name(TestConfig(method="knn", model_name="mine")) == "mine"
    assert script.results_dir(TestConfig(method="knn", results_root="r", dataset="visa")).as_posix() == \
        "r/knn/visa/1shot/seed0"


def test_a_knn_run_without_model_name_lands_in_a_knn_folder(datasets, tmp_path):
    script = load_test_script()
    assert script.main(["--data-root", str(datasets[1]), "--dataset", "target", "--results-root", str(tmp_path),
                        "--method", "knn", "--backbone", "tiny_clip", "--eval-size", "32", "--classes", "candle"]) == 0
    run = tmp_path / "knn" / "target" / "1shot" / "seed0"
    assert [p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("metrics.json")] == ["knn"]
    assert json.loads((run / "config.json").read_text())["test"]["model_name"] == "knn"  # recorded resolved
    assert (run / "report.html").is_file()
