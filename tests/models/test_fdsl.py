import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.fdsl import ASLHead, FDSL, NAM, feature_discrepancy, grid_maps


def test_feature_discrepancy_is_absolute_difference():
    q = torch.tensor([[[1.0, -2.0, 0.5]]])
    r = torch.tensor([[[0.5, 1.0, 0.5]]])
    assert feature_discrepancy(q, r).tolist() == [[[0.5, 3.0, 0.0]]]


def test_asl_head_structure_matches_reference():
    head = ASLHead(1024)
    kinds = [type(m) for m in head.net]
    assert kinds == [nn.BatchNorm1d] + [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 3 + [nn.Linear]
    linears = [m for m in head.net if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(1024, 512), (512, 128), (128, 32), (32, 2)]
    assert [l.bias is not None for l in linears] == [False, False, False, True]
    assert head.net[0].num_features == 1024


def test_asl_head_values_in_eval_mode_match_manual_computation():
    torch.manual_seed(0)
    head = ASLHead(4, hidden=(3,)).eval()
    bn0, lin1, bn1, _, lin2 = head.net
    for bn in (bn0, bn1):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(2, 5, 4)

    def bn(v, m):
        return (v - m.running_mean) / torch.sqrt(m.running_var + m.eps) * m.weight + m.bias

    h = torch.relu(bn(bn(x, bn0) @ lin1.weight.T, bn1))
    expected = h @ lin2.weight.T + lin2.bias
    torch.testing.assert_close(head(x), expected)


def test_nam_shapes_softmax_and_values():
    torch.manual_seed(1)
    nam = NAM()
    x = torch.rand(3, 2, 7, 9)
    out = nam(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out.sum(1), torch.ones(3, 7, 9))
    c1, _, c2 = nam.net
    assert (c1.in_channels, c1.out_channels, c1.kernel_size) == (2, 6, (5, 5))
    assert (c2.in_channels, c2.out_channels, c2.kernel_size) == (6, 2, (5, 5))
    manual = F.conv2d(torch.relu(F.conv2d(x, c1.weight, c1.bias, padding=2)), c2.weight, c2.bias, padding=2)
    torch.testing.assert_close(out, manual.softmax(1))


def test_grid_maps_is_row_major():
    probs = torch.arange(2 * 6 * 2, dtype=torch.float32).reshape(2, 6, 2)
    maps = grid_maps(probs, (2, 3))
    assert maps.shape == (2, 2, 2, 3)
    # patch n = row * cols + col
    assert maps[1, 1, 1, 2] == probs[1, 1 * 3 + 2, 1]
    with pytest.raises(ValueError, match="grid"):
        grid_maps(probs, (4, 4))


@pytest.mark.parametrize("use_nam", [True, False])
def test_fdsl_forward_shapes_and_test_time_maps(use_nam):
    torch.manual_seed(2)
    model = FDSL([8, 6], use_nam=use_nam, hidden=(4,)).eval()
    q = [torch.randn(3, 12, 8), torch.randn(3, 12, 6)]
    r = [torch.randn(3, 12, 8), torch.randn(3, 12, 6)]
    out = model(q, r, (3, 4))
    assert out.layer_probs.shape == (2, 3, 2, 3, 4)
    torch.testing.assert_close(out.layer_probs.sum(2), torch.ones(2, 3, 3, 4))
    if use_nam:
        assert out.nam_probs.shape == out.layer_probs.shape
        # NAM is one module shared by the layers, applied to each layer's map
        torch.testing.assert_close(out.nam_probs[1], model.nam(out.layer_probs[1]))
        torch.testing.assert_close(out.anomaly_maps(), out.nam_probs[:, :, 1])
        assert len(out.supervised_maps()) == 4
    else:
        assert out.nam_probs is None
        torch.testing.assert_close(out.anomaly_maps(), out.layer_probs[:, :, 1])
        assert len(out.supervised_maps()) == 2
