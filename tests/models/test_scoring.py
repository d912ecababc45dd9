"""The image score "mean of the highest q % of patch scores" (AnomalyDINO's mean_top1p) against a
slow reference written from the definition: sort, take floor(N * q / 100), the maximum when none."""
import pytest
import torch

from models.scoring import layer_scores, maps_and_scores, top_percent_mean


def reference_top_percent(values, percent):
    vals = sorted(values, reverse=True)
    n = int(len(vals) * percent / 100)
    return max(vals) if n == 0 else sum(vals[:n]) / n


@pytest.mark.parametrize("n_patches", [50, 99, 100, 256, 1000, 1024, 3136])
@pytest.mark.parametrize("percent", [1.0, 5.0, 100.0])
def test_top_percent_matches_sorting(n_patches, percent):
    g = torch.Generator().manual_seed(n_patches)
    x = torch.rand(3, n_patches, generator=g, dtype=torch.float64)
    got = top_percent_mean(x, percent)
    for b in range(3):
        assert got[b].item() == pytest.approx(reference_top_percent(x[b].tolist(), percent), abs=1e-12)


def test_top_one_percent_is_not_the_maximum_nor_the_mean():
    # 1024 patches: the 10 highest are averaged; a single outlier patch is damped tenfold
    x = torch.zeros(1, 1024)
    x[0, :9] = 0.5
    x[0, 9] = 1.0
    x[0, 10:] = 0.1
    assert top_percent_mean(x, 1.0).item() == pytest.approx((9 * 0.5 + 1.0) / 10)
    assert top_percent_mean(torch.tensor([[0.2, 0.9, 0.4]]), 1.0).item() == pytest.approx(0.9)  # 0 patches -> max
    with pytest.raises(ValueError, match="top percent"):
        top_percent_mean(x, 0)


def test_layer_scores_take_the_statistic_per_layer_then_the_mean():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 2, 20, 20, generator=g)  # 400 patches: top 1 % = 4 patches
    got = layer_scores(maps, 1.0)
    for b in range(2):
        per_layer = [reference_top_percent(maps[l, b].flatten().tolist(), 1.0) for l in range(3)]
        assert got[b].item() == pytest.approx(sum(per_layer) / 3, abs=1e-6)
    # None keeps the earlier rule (knn, FDSL): mean over layers of the layer maxima
    torch.testing.assert_close(layer_scores(maps), maps.amax(dim=(-2, -1)).mean(0))
    _, score = maps_and_scores(maps, (40, 40), top_percent=1.0)
    torch.testing.assert_close(score, got)
