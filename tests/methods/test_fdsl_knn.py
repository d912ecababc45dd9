import pytest
import torch

from methods import create_method, resolve_method_config
from methods.checkpoint import check_backbones, checkpoint_payload, load_method
from methods.fdsl import FDSLMethod
from methods.knn import KNNMethod
from models.backbones import create_backbone, load_backbone_config
from models.fdsl import FDSL
from models.scoring import final_image_scores, maps_and_scores
from utils.config import MethodConfig


def test_maps_and_scores_hand_made():
    # two layers, one image, 2x2 grid
    layers = torch.tensor([[[[0.1, 0.9], [0.2, 0.3]]], [[[0.5, 0.1], [0.1, 0.1]]]])
    up, score = maps_and_scores(layers, (2, 2))
    # score: mean over layers of each layer's maximum = (0.9 + 0.5) / 2
    assert score.tolist() == pytest.approx([0.7])
    # map: the layer mean (same size, so no interpolation effect)
    torch.testing.assert_close(up[0], torch.tensor([[0.3, 0.5], [0.15, 0.2]]))
    big, _ = maps_and_scores(layers, (3, 3))
    # align_corners=True keeps the corner values and puts exact midpoints in between
    assert big[0, 0, 0].item() == pytest.approx(0.3) and big[0, 0, 1].item() == pytest.approx(0.4)


def test_final_image_score_hand_made():
    head = torch.tensor([0.2, 0.4, 0.6])
    map_max = torch.tensor([1.0, 3.0, 2.0])  # min-max normalised: 0, 1, 0.5
    assert final_image_scores(head, map_max).tolist() == pytest.approx([0.1, 0.7, 0.55])
    # a constant map maximum carries no information: only the head score remains (halved)
    assert final_image_scores(head, torch.ones(3)).tolist() == pytest.approx([0.1, 0.2, 0.3])


def test_checkpoint_round_trip_and_backbone_guard(tmp_path):
    torch.manual_seed(0)
    cfg = resolve_method_config(MethodConfig(backbone="tiny_clip", params={"use_nam": True, "hidden": [8]}))
    det = create_method(cfg)
    path = tmp_path / "ckpt.pth"
    torch.save(checkpoint_payload(det, epoch=3), path)
    assert torch.load(path, weights_only=True)["epoch"] == 3
    loaded, ckpt = load_method(path)
    for k, v in det.heads.state_dict().items():
        torch.testing.assert_close(loaded.heads.state_dict()[k], v)
    assert not loaded.heads.training  # prediction always runs the heads in eval mode
    sig = dict(ckpt["backbones"]["backbone"])
    for key, other in (("layers", [1, 2]), ("layer_dims", [32] * 4), ("smooth", 3), ("model", "x")):
        with pytest.raises(ValueError, match="trained with backbone"):
            check_backbones({"backbone": {**sig, key: other}}, det, path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_method(tmp_path / "missing.pth")
    torch.save({"something": 1}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a method checkpoint"):
        load_method(tmp_path / "other.pth")
    # one method's checkpoint is refused by another, naming both
    with pytest.raises(ValueError, match="method 'fdsl', but method 'dcpsfr'"):
        load_method(path, method="dcpsfr")


def test_raw_distance_is_zero_for_a_reference_image():
    det = KNNMethod(create_backbone("tiny_clip")).eval()
    images = torch.rand(2, 3, 224, 224)
    bank = det.build_bank(images[:1])
    maps, _ = det.predict_whole(images, bank, (16, 16))
    assert maps[0].abs().max() < 1e-5 and maps[1].mean() > 1e-3


def test_checkpoint_guard_compares_weights_by_content_and_warns_on_image_size(tmp_path, caplog):
    import logging
    import shutil

    import open_clip

    open_clip.add_model_config(str(load_backbone_config.__globals__["CONFIG_DIR"] / "open_clip"))
    weights = tmp_path / "a" / "clip.pt"
    weights.parent.mkdir()
    torch.manual_seed(7)
    torch.save(open_clip.create_model("tiny-ViT-p14").state_dict(), weights)
    cfg = resolve_method_config(MethodConfig(backbone="tiny_clip", pretrained=str(weights), params={"hidden": [8]}))
    path = tmp_path / "ckpt.pth"
    torch.save(checkpoint_payload(create_method(cfg), epoch=1), path)
    moved = tmp_path / "b" / "renamed.pt"  # the same weights on another machine, at another path
    moved.parent.mkdir()
    shutil.copy(weights, moved)
    load_method(path, pretrained=str(moved))
    torch.manual_seed(9)
    other = tmp_path / "other.pt"
    torch.save(open_clip.create_model("tiny-ViT-p14").state_dict(), other)
    with pytest.raises(ValueError, match=r"weights 'clip\.pt'.*'other\.pt'.*differ in content"):
        load_method(path, pretrained=str(other))
    with pytest.raises(ValueError, match="differ in content"):  # random weights are other weights too
        load_method(path, pretrained="none")
    with caplog.at_level(logging.WARNING, logger="fsad.checkpoint"):
        load_method(path, image_size=112)
    assert "trained at 224 px" in caplog.text and "112 px" in caplog.text
    # checkpoints written before the identity was recorded are not checked
    sig = {k: v for k, v in torch.load(path, weights_only=True)["backbones"]["backbone"].items()
           if k not in ("weights", "image_size")}
    check_backbones({"backbone": sig}, create_method(resolve_method_config(MethodConfig(backbone="tiny_clip"))))


@pytest.mark.parametrize("winmode", ["nan", "mul"])
def test_prediction_runs_in_eval_mode_and_restores_the_callers_mode(winmode):
    from methods.base import InferenceOptions

    torch.manual_seed(0)
    det = FDSLMethod(create_backbone("tiny_clip"), FDSL([64] * 4, use_nam=True, hidden=(16, 8)))
    for m in det.heads.modules():  # running statistics far from a batch's own
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.05, 0.05)
            m.running_var.uniform_(0.001, 0.01)
    det.configure(InferenceOptions(winmode=winmode, win_size=8, win_stride=4))
    refs, query = torch.rand(1, 3, 224, 224), torch.rand(2, 3, 224, 224)
    state = det.fit(refs)
    det.eval()
    expected = det.predict(query, state, (32, 32))
    det.train()
    got = det.predict(query, state, (32, 32))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert det.training and det.heads.training and all(m.training for m in det.heads.modules())
    assert not det.backbone.training  # frozen backbones stay in eval mode whatever the caller asks
    whole = det.predict_whole(query, state.bank, (32, 32))
    assert det.heads.training
    det.eval()
    torch.testing.assert_close(whole, det.predict_whole(query, state.bank, (32, 32)), rtol=0, atol=0)
    if winmode != "nan":
        det.train()
        win = det.windows.predict(query, (32, 32), state.window_bank)
        assert det.heads.training
        det.eval()
        torch.testing.assert_close(win, det.windows.predict(query, (32, 32), state.window_bank), rtol=0, atol=0)
    # the train-mode result really differs: BatchNorm on batch statistics
    det.heads.train()
    with torch.no_grad():
        feats = det.backbone(query)
        from models.memory import align_to_banks
        aligned = align_to_banks(feats.patch_tokens, [state.bank] * 2)
        train_maps = det.heads(feats.patch_tokens, aligned, feats.grid).anomaly_maps()
    det.heads.eval()
    with torch.no_grad():
        eval_maps = det.heads(feats.patch_tokens, aligned, feats.grid).anomaly_maps()
    assert (train_maps - eval_maps).abs().max() > 1e-3
