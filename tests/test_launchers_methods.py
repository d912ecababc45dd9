"""METHOD and ABLATION in the launchers: knn skips training, DCP-SFR ablations land in their own
results folders, a method's folder is refused by another method, FSAD_ names with FDSL_ aliases."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.synthetic import generate

REPO = Path(__file__).resolve().parents[1]
ARGS = ["run", "cpu", "1", "nan", "8", "2", "0.5", "0", "1"]


def run(script, env_extra, args=ARGS, timeout=300):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FSAD_", "FDSL_"))}
    env = {**env, "PYTHON": sys.executable, **env_extra}
    return subprocess.run(["bash", str(REPO / script), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods_launch")
    a = generate(root / "a", ("tiles",), seed=3, size=64, n_train=3, n_test_good=3, n_test_bad=4)
    b = generate(root / "b", ("candle",), seed=4, size=64, n_train=3, n_test_good=3, n_test_bad=4)
    return {"MVTEC_ROOT": str(a), "MVTEC_NAME": "a", "VISA_ROOT": str(b), "VISA_NAME": "b",
            "FSAD_EPOCHS_MVTEC": "1", "FSAD_EPOCHS_VISA": "1", "FSAD_MAX_STEPS": "1", "FSAD_TRAIN_K_SHOT": "2",
            "RESULTS_ROOT": str(root / "results")}


@pytest.mark.slow
def test_knn_skips_training_and_is_tested_on_both_datasets(env):
    # the old FDSL_ spelling still works as an alias
    done = run("trainAndTest.sh", {**env, "METHOD": "knn", "FDSL_BACKBONE": "tiny_clip"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (Path(env["RESULTS_ROOT"]) / "run" / "checkpoints").exists()
    results = Path(env["RESULTS_ROOT"]) / "run_nan"  # results folders name the test settings
    for dataset in ("a", "b"):
        config = json.loads((results / dataset / "1shot" / "seed0" / "config.json").read_text())
        assert config["method"]["method"] == "knn" and config["checkpoint_epoch"] is None
        assert config["backbones"]["backbone"]["name"] == "tiny_clip"
    # FDSL under the same model_name has its own folders (nam tag): it looks for its own heads
    other = run("test_few_shot.sh", {**env, "METHOD": "fdsl", "FSAD_BACKBONE": "tiny_clip"})
    assert other.returncode == 2 and "checkpoint not found" in other.stderr and "train_a_nam1" in other.stderr


@pytest.mark.slow
def test_dcpsfr_ablations_land_in_their_own_folders(env):
    tiny = {**env, "METHOD": "dcpsfr", "FSAD_BACKBONE": "clip=tiny_clip,dino=tiny_dinov2"}
    for ablation, switch in (("none", None), ("no_caca", "use_caca"), ("no_acl", "use_acl"), ("no_ssr", "use_ssr")):
        done = run("trainAndTest.sh", {**tiny, "ABLATION": ablation}, args=["dcp", *ARGS[1:]])
        assert done.returncode == 0, (ablation, done.stderr[-3000:])
        folder = Path(env["RESULTS_ROOT"]) / ("dcp" if ablation == "none" else f"dcp-{ablation}")
        ckpt = folder / "checkpoints" / "train_a_dcpsfr" / "seed111" / "epoch_1.pth"  # the training seed
        assert ckpt.is_file()
        config = json.loads((folder.parent / f"{folder.name}_nan" / "b" / "1shot" / "seed0" / "config.json").read_text())
        assert config["method"]["method"] == "dcpsfr"
        for key in ("use_caca", "use_acl", "use_ssr"):
            assert config["method"][key] is (key != switch)
    bad = run("trainAndTest.sh", {**tiny, "ABLATION": "no_everything"})
    assert bad.returncode == 2 and "ABLATION" in bad.stderr and "no_acl" in bad.stderr
    windows = run("trainAndTest.sh", tiny, args=["w", "cpu", "1", "mul", "8", "2", "0.5", "0", "1"])
    assert windows.returncode == 2 and "whole images only" in windows.stderr
    assert not any(Path(env["RESULTS_ROOT"]).glob("w*"))  # refused before any training


@pytest.mark.slow
def test_anomalydino_and_knn_ablations_are_training_free(env):
    tiny = {**env, "FSAD_BACKBONE": "tiny_dinov2", "FSAD_IMAGE_SIZE": "112"}
    done = run("trainAndTest.sh", {**tiny, "METHOD": "anomalydino"}, args=["ad", *ARGS[1:]])
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (Path(env["RESULTS_ROOT"]) / "ad" / "checkpoints").exists()
    for dataset in ("a", "b"):
        config = json.loads((Path(env["RESULTS_ROOT"]) / "ad_nan" / dataset / "1shot" / "seed0" / "config.json").read_text())
        assert config["method"]["method"] == "anomalydino" and config["method"]["top_percent"] == 1.0
    # a knn ablation's parameters reach the test, and its results have their own folder
    done = run("trainAndTest.sh", {**tiny, "METHOD": "knn", "ABLATION": "aug"}, args=["kn", *ARGS[1:]])
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((Path(env["RESULTS_ROOT"]) / "kn-aug_nan" / "b" / "1shot" / "seed0" / "config.json").read_text())
    assert config["test"]["params"] == {"rotations": [0, 45, 90, 135, 180, 225, 270, 315]}
    assert config["method"]["rotations"] == config["test"]["params"]["rotations"]


def test_unknown_method_is_named(env):
    bad = run("trainAndTest.sh", {**env, "METHOD": "patchcore"})
    assert bad.returncode == 2 and "METHOD" in bad.stderr and "anomalydino, dcpsfr, fdsl, knn, subspacead" in bad.stderr


@pytest.mark.slow
def test_subspacead_is_training_free_records_its_subspace_and_refuses_windows(env):
    tiny = {**env, "METHOD": "subspacead", "FSAD_BACKBONE": "tiny_dinov2"}
    done = run("test_few_shot.sh", {**tiny, "ABLATION": "no_aug"}, args=["sub", *ARGS[1:]])
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (Path(env["RESULTS_ROOT"]) / "sub-no_aug" / "checkpoints").exists()
    for dataset, cls in (("a", "tiles"), ("b", "candle")):
        run_dir = Path(env["RESULTS_ROOT"]) / "sub-no_aug_nan" / dataset / "1shot" / "seed0"
        config = json.loads((run_dir / "config.json").read_text())
        assert config["method"]["method"] == "subspacead" and config["checkpoint_epoch"] is None
        assert config["method"]["augment_count"] == 0 and config["backbones"]["backbone"]["name"] == "tiny_dinov2"
        info = json.loads((run_dir / "metrics.json").read_text())["categories"][cls]
        # memory per category: the subspace (float32 mean, basis, eigenvalues) of the 1 reference
        rank = info["subspace_rank"]
        assert info["subspace_bytes"] == 4 * (64 + 64 * rank + rank) and 1 <= rank <= 63
        assert info["reference_images_fitted"] == 1
    windows = run("test_few_shot.sh", tiny, args=["w", "cpu", "1", "mul", "8", "2", "0.5", "0", "1"])
    assert windows.returncode == 2 and "whole images only" in windows.stderr
    assert not any(Path(env["RESULTS_ROOT"]).glob("w*"))  # refused before any work
