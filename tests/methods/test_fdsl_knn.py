import pytest
import torch

from methods import create_method, resolve_method_config
from methods.checkpoint import check_backbones, checkpoint_payload, load_method
from methods.fdsl import FDSLMethod
from methods.knn import KNNMethod
from models.backbones import create_backbone
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
