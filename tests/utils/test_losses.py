import math

import pytest
import torch

from utils.losses import dice_loss, focal_loss, segmentation_loss


def two_channel(p_anomaly):
    p = torch.tensor(p_anomaly, dtype=torch.float32)
    return torch.stack([1 - p, p], dim=1)


def test_focal_loss_hand_computed():
    # one anomalous pixel predicted 0.8, one normal pixel predicted 0.8 (so p_t = 0.2)
    probs = two_channel([[[0.8, 0.8]]])
    target = torch.tensor([[[1.0, 0.0]]])
    expected = (-(0.2 ** 2) * math.log(0.8) - (0.8 ** 2) * math.log(0.2)) / 2
    assert focal_loss(probs, target).item() == pytest.approx(expected, rel=1e-6)


def test_focal_loss_gamma_zero_is_cross_entropy_and_perfect_is_zero():
    probs = two_channel([[[0.3, 0.9], [0.6, 0.1]]])
    target = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    ce = -(math.log(0.7) + math.log(0.9) + math.log(0.6) + math.log(0.9)) / 4
    assert focal_loss(probs, target, gamma=0).item() == pytest.approx(ce, rel=1e-6)
    assert focal_loss(two_channel([[[0.0, 1.0]]]), torch.tensor([[[0.0, 1.0]]])).item() == pytest.approx(0, abs=1e-9)


def test_focal_loss_is_finite_at_confident_mistakes():
    assert math.isfinite(focal_loss(two_channel([[[0.0]]]), torch.tensor([[[1.0]]])).item())


def test_dice_loss_hand_computed_per_sample_mean():
    p = torch.tensor([[[1.0, 0.0, 0.5, 0.5]], [[0.0, 0.0, 0.0, 0.0]]])
    y = torch.tensor([[[1.0, 0.0, 1.0, 0.0]], [[0.0, 0.0, 0.0, 0.0]]])
    # sample 1: (2*1.5 + 1) / (2 + 2 + 1) = 0.8; sample 2 (empty, smooth 1): 1/1 = 1
    assert dice_loss(p, y).item() == pytest.approx(1 - (0.8 + 1.0) / 2)


def test_segmentation_loss_sums_every_map():
    probs = two_channel([[[0.3, 0.6]]])
    y = torch.tensor([[[0.0, 1.0]]])
    one = focal_loss(probs, y) + dice_loss(probs[:, 1], y)
    assert segmentation_loss([probs, probs, probs], y).item() == pytest.approx(3 * one.item())


def test_focal_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\(B, 2, H, W\)"):
        focal_loss(torch.rand(1, 3, 2, 2), torch.zeros(1, 2, 2))
