"""trainAndTest.sh / test_few_shot.sh with the tiny backbone on CPU, and their argument errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.synthetic import generate
from launch import parse_positional

REPO = Path(__file__).resolve().parents[1]


def run(script, args, env_extra, timeout=300):
    env = {**os.environ, "PYTHON": sys.executable, **env_extra}
    return subprocess.run(["bash", str(REPO / script), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    a = generate(root / "a", ("tiles", "bolt"), seed=3, size=64, n_train=3, n_test_good=3, n_test_bad=4)
    b = generate(root / "b", ("candle",), seed=4, size=64, n_train=3, n_test_good=3, n_test_bad=4)
    return {"MVTEC_ROOT": str(a), "MVTEC_NAME": "a", "VISA_ROOT": str(b), "VISA_NAME": "b",
            "FDSL_BACKBONE": "tiny_clip", "FDSL_EPOCHS_MVTEC": "2", "FDSL_EPOCHS_VISA": "1",
            "FDSL_MAX_STEPS": "1", "FDSL_TRAIN_K_SHOT": "2", "RESULTS_ROOT": str(root / "results")}


@pytest.mark.slow
def test_train_and_test_then_test_only(env):
    args = ["smoke", "cpu", "1", "nan", "13", "2", "0.5", "7", "2"]
    first = run("trainAndTest.sh", args, env)
    assert first.returncode == 0, first.stderr[-3000:]
    results = Path(env["RESULTS_ROOT"]) / "smoke"
    assert (results / "checkpoints" / "train_a_nam1" / "seed7" / "epoch_2.pth").is_file()
    assert (results / "checkpoints" / "train_b_nam1" / "seed7" / "epoch_1.pth").is_file()
    for dataset, classes in (("b", {"candle"}), ("a", {"tiles", "bolt"})):
        run_dir = results / dataset / "2shot" / "seed7"
        for name in ("config.json", "metrics.json", "table.md"):
            assert (run_dir / name).is_file(), run_dir / name
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert set(metrics["per_category"]) == classes
        config = json.loads((run_dir / "config.json").read_text())
        assert config["test"]["seed"] == 7 and config["test"]["k_shot"] == 2 and config["method"]["use_nam"]
    assert "i-AUROC" in first.stdout
    stamp = (results / "b" / "2shot" / "seed7" / "metrics.json").stat().st_mtime_ns
    again = run("test_few_shot.sh", args, env)  # finished seeds are skipped
    assert again.returncode == 0, again.stderr[-3000:]
    assert (results / "b" / "2shot" / "seed7" / "metrics.json").stat().st_mtime_ns == stamp
    # the same model_name with other training settings is refused, not silently reused
    changed = run("trainAndTest.sh", args, {**env, "FDSL_MAX_STEPS": "2"})
    assert changed.returncode == 2 and "other settings (differs in max_steps)" in changed.stderr


def test_window_and_k_arguments_are_checked_before_training(env, tmp_path):
    fresh = {**env, "RESULTS_ROOT": str(tmp_path)}
    too_big = run("trainAndTest.sh", ["w", "cpu", "1", "mul", "40", "2", "0.5", "0", "1"], fresh, timeout=120)
    assert too_big.returncode == 2 and "win_size=40" in too_big.stderr and "16" in too_big.stderr
    k = run("trainAndTest.sh", ["w", "cpu", "1", "nan", "13", "2", "0.5", "0", "4"], fresh, timeout=120)
    assert k.returncode == 2 and "k-shot 4" in k.stderr
    assert not any(tmp_path.rglob("*.pth"))  # nothing was trained
    bad_env = run("trainAndTest.sh", ["w", "cpu", "1", "nan", "13", "2", "0.5", "0", "1"],
                  {**fresh, "FDSL_EPOCHS_VISA": "five"}, timeout=120)
    assert bad_env.returncode == 2 and "FDSL_EPOCHS_VISA" in bad_env.stderr


@pytest.mark.parametrize("args, message", [
    (["fdsl", "cpu", "1", "nan"], "expected 9 arguments"),
    (["fdsl", "cpu", "2", "nan", "13", "2", "0.5", "0", "1"], "useNAM: expected 0 or 1"),
    (["fdsl", "cpu", "1", "max", "13", "2", "0.5", "0", "1"], "winmode: expected one of nan, mul, onlywin"),
    (["fdsl", "cpu", "1", "nan", "x", "2", "0.5", "0", "1"], "win-size: expected an integer"),
    (["fdsl", "cpu", "1", "nan", "13", "2", "0.5", "0", "0"], "kshots: expected >= 1"),
    (["fdsl", "cpu", "1", "nan", "13", "2", "0.5", "-1", "1"], "seed: expected >= 0, got -1"),
])
def test_bad_arguments_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        parse_positional(args)


def test_errors_reach_the_user_in_one_line(env, tmp_path):
    bad_root = run("test_few_shot.sh", ["x", "cpu", "1", "nan", "13", "2", "0.5", "0", "1"],
                   {**env, "VISA_ROOT": str(tmp_path / "nowhere")}, timeout=120)
    assert bad_root.returncode == 2
    assert "VISA_ROOT" in bad_root.stderr and str(tmp_path / "nowhere") in bad_root.stderr
    missing_ckpt = run("test_few_shot.sh", ["never_trained", "cpu", "1", "nan", "13", "2", "0.5", "0", "1"], env,
                       timeout=120)
    assert missing_ckpt.returncode == 2 and "checkpoint not found" in missing_ckpt.stderr
    if not torch.cuda.is_available():
        gpu = run("test_few_shot.sh", ["x", "0", "1", "nan", "13", "2", "0.5", "0", "1"], env, timeout=120)
        assert gpu.returncode == 2 and "no usable CUDA GPU" in gpu.stderr and "cpu" in gpu.stderr
    k_too_big = run("test_few_shot.sh", ["smoke", "cpu", "1", "nan", "13", "2", "0.5", "7", "9"], env, timeout=120)
    assert k_too_big.returncode == 2 and "k-shot 9" in k_too_big.stderr
