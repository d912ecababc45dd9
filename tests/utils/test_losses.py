import math

import pytest
import torch

from utils.losses import SOBEL_MAX_MAGNITUDE, dice_loss, edge_dice_loss, edge_map, focal_loss, segmentation_loss


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


def slow_focal(probs, target, gamma, alpha, eps=1e-6):
    """Per-pixel definition of the alpha-balanced focal loss."""
    total, count = 0.0, 0
    B, _, H, W = probs.shape
    for b in range(B):
        for i in range(H):
            for j in range(W):
                y = float(target[b, i, j])
                p_t = float(probs[b, 1, i, j]) if y == 1 else float(probs[b, 0, i, j])
                p_t = min(max(p_t, eps), 1.0)
                w = 1.0 if alpha is None else (alpha if y == 1 else 1 - alpha)
                total += -w * (1 - p_t) ** gamma * math.log(p_t)
                count += 1
    return total / count


@pytest.mark.parametrize("alpha,gamma", [(0.9, 2.0), (0.25, 0.0), (0.5, 1.5), (None, 2.0)])
def test_alpha_focal_matches_per_pixel_reference(alpha, gamma):
    g = torch.Generator().manual_seed(0)
    p = torch.rand(2, 3, 4, generator=g)
    probs = torch.stack([1 - p, p], dim=1)
    target = (torch.rand(2, 3, 4, generator=g) > 0.7).float()
    got = focal_loss(probs, target, gamma=gamma, alpha=alpha).item()
    assert got == pytest.approx(slow_focal(probs, target, gamma, alpha), rel=1e-5)


def test_alpha_none_is_bit_identical_to_the_unweighted_formula():
    g = torch.Generator().manual_seed(1)
    p = torch.rand(3, 5, 5, generator=g)
    probs = torch.stack([1 - p, p], dim=1)
    target = (torch.rand(3, 5, 5, generator=g) > 0.5).float()
    t = target
    p_t = (probs[:, 1] * t + probs[:, 0] * (1 - t)).clamp(min=1e-6, max=1.0)
    before = (-(1 - p_t) ** 2.0 * torch.log(p_t)).mean()  # the formula FDSL was trained with
    assert torch.equal(focal_loss(probs, target), before)
    assert torch.equal(focal_loss(probs, target, alpha=None), before)
    # alpha = 0.5 halves every term
    assert focal_loss(probs, target, alpha=0.5).item() == pytest.approx(before.item() / 2, rel=1e-6)


def test_sobel_max_magnitude_is_two_sqrt_five_and_reached():
    assert SOBEL_MAX_MAGNITUDE == pytest.approx(2 * math.sqrt(5))
    x = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0]]])
    assert edge_map(x)[0, 1, 1].item() == pytest.approx(1.0)
    g = torch.Generator().manual_seed(2)
    e = edge_map(torch.rand(4, 9, 9, generator=g).round())
    assert e.min() >= 0 and e.max() <= 1 + 1e-6


def test_edge_map_hand_computed():
    step = torch.tensor([[[0.0, 0.0, 1.0]] * 3])
    s = 4 / math.sqrt(20)  # a straight unit step: Gx = 1 + 2 + 1 on both sides of it
    torch.testing.assert_close(edge_map(step), torch.tensor([[[0.0, s, s]] * 3]))
    dot = torch.zeros(1, 3, 3)
    dot[0, 1, 1] = 1.0
    c, m = math.sqrt(2) / math.sqrt(20), 2 / math.sqrt(20)  # corners see (1, 1), edges (0, 2) or (2, 0)
    torch.testing.assert_close(edge_map(dot), torch.tensor([[[c, m, c], [m, 0.0, m], [c, m, c]]]))
    # replicate padding: a constant map has no edges, not even at the border
    assert edge_map(torch.full((1, 4, 4), 0.7)).max() < 1e-6  # float rounding only


def square(size=16, top=4, left=4, side=6):
    m = torch.zeros(1, size, size)
    m[0, top:top + side, left:left + side] = 1.0
    return m


def test_edge_dice_identical_shifted_and_empty():
    a = square()
    assert edge_dice_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    shifted = edge_dice_loss(square(left=6), a).item()
    far = edge_dice_loss(square(top=9, left=9, side=6), a).item()
    assert shifted > 0.3 and far > shifted
    empty = torch.zeros(2, 8, 8)
    assert edge_dice_loss(empty, empty).item() == 0.0
    # a prediction with edges where the mask has none is penalised
    assert edge_dice_loss(a, torch.zeros_like(a)).item() > 0.9


def test_edge_dice_linear_denominator_hand_computed():
    step = torch.tensor([[[0.0, 0.0, 1.0]] * 3])
    e = 4 / math.sqrt(20)
    # six pixels with edge e on both sides
    expected = 1 - (2 * 6 * e * e + 1) / (12 * e + 1)
    assert edge_dice_loss(step, step, squared=False).item() == pytest.approx(expected, rel=1e-6)
    assert edge_dice_loss(step, step, zeta=0.5).item() == pytest.approx(0.0, abs=1e-7)


def test_edge_dice_gradient_is_finite_on_flat_maps():
    p = torch.full((1, 5, 5), 0.3, requires_grad=True)
    edge_dice_loss(p, square(5, 1, 1, 2)).backward()
    assert torch.isfinite(p.grad).all()
