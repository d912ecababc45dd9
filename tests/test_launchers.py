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
    root = Path(env["RESULTS_ROOT"])
    # heads: trained once with the authors' fixed seed, whatever the test seed; results: by settings
    ckpts = root / "smoke" / "checkpoints"
    assert (ckpts / "train_a_nam1" / "seed111" / "epoch_2.pth").is_file()
    assert (ckpts / "train_b_nam1" / "seed111" / "epoch_1.pth").is_file()
    results = root / "smoke_nam1_nan"
    for dataset, classes in (("b", {"candle"}), ("a", {"tiles", "bolt"})):
        run_dir = results / dataset / "2shot" / "seed7"
        for name in ("config.json", "metrics.json", "table.md"):
            assert (run_dir / name).is_file(), run_dir / name
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert set(metrics["per_category"]) == classes
        config = json.loads((run_dir / "config.json").read_text())
        assert config["test"]["seed"] == 7 and config["test"]["k_shot"] == 2 and config["method"]["use_nam"]
        assert config["train"]["seed"] == 111
    assert "i-AUROC" in first.stdout
    stamp = (results / "b" / "2shot" / "seed7" / "metrics.json").stat().st_mtime_ns
    heads = {p: p.stat().st_mtime_ns for p in ckpts.rglob("*.pth")}
    again = run("test_few_shot.sh", args, env)  # finished seeds are skipped
    assert again.returncode == 0, again.stderr[-3000:]
    assert (results / "b" / "2shot" / "seed7" / "metrics.json").stat().st_mtime_ns == stamp
    # nan ignores the window arguments: the same results folder, reused, nothing retrained
    same = run("trainAndTest.sh", ["smoke", "cpu", "1", "nan", "8", "4", "0.3", "7", "2"], env)
    assert same.returncode == 0, same.stderr[-3000:]
    assert (results / "b" / "2shot" / "seed7" / "metrics.json").stat().st_mtime_ns == stamp
    # the same model_name with other training settings is refused before training, not silently reused
    changed = run("trainAndTest.sh", args, {**env, "FDSL_MAX_STEPS": "2"})
    assert changed.returncode == 2 and "other settings (differs in max_steps)" in changed.stderr
    # more epochs continue the same heads, but results tested on the old epoch are found before training
    longer = run("trainAndTest.sh", args, {**env, "FDSL_EPOCHS_VISA": "2"})
    assert longer.returncode == 2 and "smoke_nam1_nan" in longer.stderr and "differs in checkpoint" in longer.stderr
    assert {p: p.stat().st_mtime_ns for p in ckpts.rglob("*.pth")} == heads  # nothing was trained


@pytest.mark.slow
def test_two_configurations_and_two_test_seeds_share_one_model_name(env, tmp_path):
    """The authors' README runs one model_name with several configurations: each gets its own
    results folder, all of them use the heads trained once."""
    fresh = {**env, "RESULTS_ROOT": str(tmp_path)}
    nan = run("trainAndTest.sh", ["fdsl", "cpu", "1", "nan", "13", "2", "0.5", "14", "1"], fresh)
    assert nan.returncode == 0, nan.stderr[-3000:]
    heads = {p: p.stat().st_mtime_ns for p in (tmp_path / "fdsl" / "checkpoints").rglob("*.pth")}
    assert len(heads) == 3  # epochs 1-2 on a, epoch 1 on b
    mul = run("trainAndTest.sh", ["fdsl", "cpu", "1", "mul", "8", "4", "0.5", "14", "1"], fresh)
    assert mul.returncode == 0, mul.stderr[-3000:]
    other_seed = run("test_few_shot.sh", ["fdsl", "cpu", "1", "mul", "8", "4", "0.5", "15", "1"], fresh)
    assert other_seed.returncode == 0, other_seed.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "fdsl" / "checkpoints").rglob("*.pth")} == heads
    for folder, seeds in (("fdsl_nam1_nan", [14]), ("fdsl_nam1_mul-w8s4x0.5-idxwin", [14, 15])):
        for seed in seeds:
            config = json.loads((tmp_path / folder / "b" / "1shot" / f"seed{seed}" / "config.json").read_text())
            assert config["test"]["winmode"] == folder.split("_")[-1].split("-")[0]
            assert config["test"]["checkpoint"].endswith("train_a_nam1/seed111/epoch_2.pth")
    summary = subprocess.run([sys.executable, "-m", "utils.report", "aggregate", str(tmp_path)], capture_output=True,
                             text=True, cwd=REPO, timeout=120)
    assert summary.returncode == 0, summary.stderr
    rows = (tmp_path / "summary" / "comparison.md").read_text()
    assert "| fdsl_nam1_nan " in rows and "| fdsl_nam1_mul-w8s4x0.5-idxwin " in rows


def test_folder_names(monkeypatch):
    from launch import checkpoint_dir, datasets, method_plan, results_folder

    def names(args, **env):
        for k in ("FSAD_IMAGE_INDEX", "FSAD_EVAL_SIZE", "FSAD_TRAIN_SEED", "FDSL_TRAIN_SEED", "METHOD", "ABLATION",
                  "FDSL_PRECISION"):
            monkeypatch.delenv(k, raising=False)
        # device 0 (as the authors' examples) must not need a GPU here: the precision is given
        monkeypatch.setenv("FSAD_PRECISION", "fp32")
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        launch = parse_positional(args.split())
        plan = method_plan(launch)
        return results_folder(launch, plan), checkpoint_dir(launch, plan, datasets()[0]).parts[-2:]

    assert names("fdsl 0 1 mul 13 2 0.5 14 1") == ("fdsl_nam1_mul-w13s2x0.5-idxwin", ("train_mvtec_nam1", "seed111"))
    assert names("fdsl 0 0 nan 13 2 0.5 14 1")[0] == "fdsl_nam0_nan"
    assert names("fdsl 0 1 nan 13 2 0.5 14 1", FSAD_IMAGE_INDEX="off") == names("fdsl 0 1 nan 5 1 1 14 1")
    assert names("fdsl 0 1 nan 13 2 0.5 14 1", FSAD_IMAGE_INDEX="all")[0] == "fdsl_nam1_nan-idxall"
    assert names("fdsl 0 1 onlywin 13 2 0.5 14 1", FSAD_IMAGE_INDEX="off")[0] == "fdsl_nam1_onlywin-w13s2-idxoff"
    assert names("x 0 1 nan 13 2 0.5 14 1", FSAD_EVAL_SIZE="0", FDSL_TRAIN_SEED="same") == \
        ("x_nam1_nan_evalfull_trainseed-same", ("train_mvtec_nam1", "seed14"))
    assert names("x 0 1 nan 13 2 0.5 14 1", FSAD_TRAIN_SEED="3")[1] == ("train_mvtec_nam1", "seed3")
    assert names("k 0 1 mul 8 2 0.25 0 1", METHOD="knn", FSAD_TRAIN_SEED="3")[0] == "k_mul-w8s2x0.25-idxwin"
    assert names("d 0 1 nan 8 2 0.5 0 1", METHOD="dcpsfr", ABLATION="no_acl")[0] == "d-no_acl_nan"
    with pytest.raises(ValueError, match="FSAD_TRAIN_SEED: expected an integer >= 0 or 'same', got 'sometimes'"):
        names("x 0 1 nan 13 2 0.5 14 1", FSAD_TRAIN_SEED="sometimes")
    # reduced precision names both folders; 'auto' on CPU is fp32 and names nothing
    assert names("p cpu 1 nan 13 2 0.5 14 1", FSAD_PRECISION="bf16") == ("p_nam1_nan_bf16", ("train_mvtec_nam1_bf16",
                                                                                           "seed111"))
    assert names("p cpu 1 nan 13 2 0.5 14 1", FSAD_PRECISION="auto") == names("p cpu 1 nan 13 2 0.5 14 1")
    with pytest.raises(ValueError, match="FSAD_PRECISION: precision must be one of auto, fp32, bf16, fp16, got 'half'"):
        names("p cpu 1 nan 13 2 0.5 14 1", FSAD_PRECISION="half")
    with pytest.raises(ValueError, match="FSAD_PRECISION: precision fp16 is for CUDA GPUs"):
        names("p cpu 1 nan 13 2 0.5 14 1", FSAD_PRECISION="fp16")


def test_fdsl_defaults_to_the_authors_activation_and_knn_to_the_native_one(monkeypatch):
    from launch import method_plan

    monkeypatch.delenv("FSAD_BACKBONE", raising=False)
    monkeypatch.delenv("FDSL_BACKBONE", raising=False)
    for method, backbone in (("fdsl", "clip_vit_l14_336_authors"), ("knn", "clip_vit_l14_336")):
        monkeypatch.setenv("METHOD", method)
        plan = method_plan(parse_positional(["m", "cpu", "1", "nan", "13", "2", "0.5", "0", "1"]))
        assert plan.config["backbones"]["backbone"]["config"] == backbone


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
