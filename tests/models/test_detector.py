import pytest
import torch

from models.backbones import create_backbone
from models.detector import (FDSLDetector, check_backbone, checkpoint_payload, final_image_scores, load_detector,
                             maps_and_scores)
from models.fdsl import FDSL
from utils.config import ModelConfig


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
    cfg = ModelConfig(backbone="tiny_clip", use_nam=True, hidden=(8,))
    det = FDSLDetector.build(cfg)
    path = tmp_path / "ckpt.pth"
    torch.save(checkpoint_payload(det, cfg, epoch=3), path)
    assert torch.load(path, weights_only=True)["epoch"] == 3
    loaded, ckpt = load_detector(path)
    for k, v in det.heads.state_dict().items():
        torch.testing.assert_close(loaded.heads.state_dict()[k], v)
    sig = dict(ckpt["backbone"])
    for key, other in (("layers", [1, 2]), ("layer_dims", [32] * 4), ("smooth", 3), ("model", "x")):
        with pytest.raises(ValueError, match="trained with backbone"):
            check_backbone({**sig, key: other}, det.backbone, path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_detector(tmp_path / "missing.pth")
    torch.save({"something": 1}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an FDSL heads checkpoint"):
        load_detector(tmp_path / "other.pth")


def test_raw_distance_is_zero_for_a_reference_image():
    det = FDSLDetector(create_backbone("tiny_clip"), FDSL([64] * 4, hidden=(4,))).eval()
    images = torch.rand(2, 3, 224, 224)
    bank = det.build_bank(images[:1])
    maps, _ = det.predict_raw_distance(images, bank, (16, 16))
    assert maps[0].abs().max() < 1e-5 and maps[1].mean() > 1e-3
