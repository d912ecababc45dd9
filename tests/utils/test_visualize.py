"""Overlays and panels on one colour scale, the picking of worst images, and curve PNGs drawn from the
exact curves of utils/metrics.py (whose refactor must leave every metric bit-identical)."""
import numpy as np
import pytest
from PIL import Image

from utils import metrics
from utils.metrics import aupro, auroc, average_precision, pr_curve, pro_curve, roc_curve
from utils.visualize import (PANEL_GAP, PANEL_HEADER, ColourScale, overlay, panel, pick_images, save_curves,
                             save_panel)


def _case(seed, n=4, h=12, w=9):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), bool)
    masks[1, 2:6, 3:7] = True
    masks[2, 8:11, 0:2] = True
    masks[2, 0, 8] = True
    maps = rng.random((n, h, w)).astype(np.float32) + masks * rng.uniform(0.0, 0.8)
    maps[3, :6] = 0.25  # ties across normal and defect pixels
    maps[1, 2:4, 3:7] = 0.25
    return masks, maps


# --------------------------------------------------------------------------- #
# curves from utils/metrics.py
# --------------------------------------------------------------------------- #
def _trapezoid(x, y):
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) / 2.0)


@pytest.mark.parametrize("seed", range(6))
def test_roc_curve_runs_from_origin_to_one_and_its_area_is_auroc(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(60) < 0.3
    scores = np.round(rng.random(60) + labels * 0.4, 1)  # rounding makes many ties
    fpr, tpr = roc_curve(labels, scores)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert _trapezoid(fpr, tpr) == pytest.approx(auroc(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_pr_curve_steps_sum_to_average_precision(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(50) < 0.4
    scores = np.round(rng.random(50) + labels * 0.3, 1)
    recall, precision = pr_curve(labels, scores)
    assert (recall[0], precision[0]) == (0.0, 1.0) and recall[-1] == 1.0
    assert float(np.sum(np.diff(recall) * precision[1:])) == pytest.approx(average_precision(labels, scores),
                                                                             abs=1e-12)


@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_pro_curve_stops_at_the_fpr_limit_and_its_area_is_aupro(limit):
    masks, maps = _case(0)
    fpr, pro = pro_curve(masks, maps, limit)
    assert (fpr[0], pro[0]) == (0.0, 0.0) and fpr[-1] == limit and np.all(fpr <= limit)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
    assert _trapezoid(fpr, pro) / limit == aupro(masks, maps, limit)  # the very numbers aupro sums


def test_curves_are_none_when_undefined():
    assert roc_curve([0, 0, 0], [0.1, 0.2, 0.3]) is None and pr_curve([1, 1], [0.1, 0.2]) is None
    assert pro_curve(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4))) is None


# The metrics module before the curve functions were split out of it, kept verbatim as the reference.
def _old_partial_area(x, y, limit):
    k = int(np.searchsorted(x, limit, side="right"))
    xs, ys = x[:k], y[:k]
    if xs[-1] < limit and k < x.size:
        x0, x1, y0, y1 = x[k - 1], x[k], y[k - 1], y[k]
        xs = np.append(xs, limit)
        ys = np.append(ys, y0 + (limit - x0) * (y1 - y0) / (x1 - x0))
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1])) / 2.0) / limit


def _old_aupro_from_runs(r, n_normal, fpr_limit):
    fp_ge = r.n_ge - r.tp_ge
    fp_gt = r.n_gt - (r.tp_ge - r.count)
    pro_ge = r.w_ge
    pro_gt = np.concatenate(([0.0], pro_ge[:-1]))
    fpr = np.empty(2 * fp_ge.size + 2)
    pro = np.empty_like(fpr)
    fpr[0], pro[0] = 0.0, 0.0
    fpr[1:-1:2], pro[1:-1:2] = fp_gt / n_normal, pro_gt
    fpr[2:-1:2], pro[2:-1:2] = fp_ge / n_normal, pro_ge
    fpr[-1], pro[-1] = 1.0, pro_ge[-1]
    return _old_partial_area(fpr, pro, fpr_limit)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("limit", [0.3, 0.01, 1.0])
def test_aupro_is_bit_identical_to_before_the_refactor(seed, limit):
    masks, maps = _case(seed, n=4 + seed % 3, h=12 + seed, w=9 + 2 * seed)
    ids, n_regions = metrics._defect_region_ids(masks)
    r = metrics._runs(maps.ravel(), masks.ravel(), metrics._region_weights(ids, n_regions))
    old = _old_aupro_from_runs(r, masks.size - ids.size, limit)
    assert aupro(masks, maps, limit) == old
    labels = masks.reshape(masks.shape[0], -1).any(1)
    scores = maps.reshape(maps.shape[0], -1).max(1)
    assert metrics.compute_category_metrics(labels, scores, masks, maps, limit)["p_aupro"] == old


# --------------------------------------------------------------------------- #
# one colour scale
# --------------------------------------------------------------------------- #
def test_a_value_has_one_colour_whatever_else_is_in_the_map():
    scale = ColourScale()
    photo = np.full((6, 8, 3), 0.5, np.float32)
    quiet = np.full((6, 8), 0.1, np.float32)  # a normal photo: low everywhere
    loud = quiet.copy()
    loud[:2, :2] = 0.9
    a, b = overlay(photo, quiet, scale), overlay(photo, loud, scale)
    assert np.array_equal(a[3:, 3:], b[3:, 3:])  # per-image stretching would paint `quiet` hot
    assert not np.array_equal(a[:2, :2], b[:2, :2])
    assert a[0, 0, 2] > a[0, 0, 0]  # jet: low values are blue, not red


def test_the_threshold_sits_at_the_middle_colour():
    scale = ColourScale.for_threshold(0.2)
    assert (scale.vmin, scale.vcenter, scale.vmax) == (0.0, 0.2, 1.0)
    np.testing.assert_allclose(scale.normalise([0.0, 0.1, 0.2, 0.6, 1.0, 3.0, -1.0]),
                               [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 0.0])
    assert ColourScale.for_threshold(None).vcenter is None
    wide = ColourScale.for_threshold(1.5)  # knn distances may pass 1
    assert (wide.vcenter, wide.vmax) == (1.5, 3.0)
    with pytest.raises(ValueError, match="colormap"):
        ColourScale(colormap="no_such_map")
    with pytest.raises(ValueError, match="between"):
        ColourScale(0.0, 1.0, 1.0)


def test_overlay_is_at_the_photo_size_with_the_map_upsampled():
    photo = np.random.default_rng(0).random((30, 50, 3)).astype(np.float32)
    amap = np.zeros((7, 7), np.float32)
    amap[3, 3] = 1.0
    out = overlay(photo, amap, ColourScale())
    assert out.shape == (30, 50, 3) and out.dtype == np.uint8
    assert out[15, 25, 0] > out[0, 0, 0]  # the hot centre moved to the photo's centre


# --------------------------------------------------------------------------- #
# panels and picking
# --------------------------------------------------------------------------- #
def test_panel_png_has_four_tiles_at_the_image_size(tmp_path):
    h, w = 24, 40  # non-square: height and width must not swap
    image = np.random.default_rng(1).random((3, h, w)).astype(np.float32)  # (3, H, W) like a model input
    gt = np.zeros((12, 20), bool)
    gt[3:6, 10:15] = True
    amap = np.zeros((16, 16), np.float32)
    amap[2:6, 8:12] = 0.9
    path = save_panel(tmp_path / "p.png", image, amap, ColourScale.for_threshold(0.5), gt, threshold=0.5)
    with Image.open(path) as im:
        assert im.size == (4 * w + 3 * PANEL_GAP, PANEL_HEADER + h) and im.mode == "RGB"
        arr = np.asarray(im)
    mask_tile = arr[PANEL_HEADER:, 3 * (w + PANEL_GAP):]
    gt_tile = arr[PANEL_HEADER:, w + PANEL_GAP:2 * w + PANEL_GAP]
    assert mask_tile[8, 25].max() == 255 and mask_tile[20, 2].max() == 0
    assert gt_tile[8, 25].max() == 255 and gt_tile[20, 2].max() == 0
    big = panel(np.zeros((1000, 500, 3), np.uint8), np.zeros((4, 4)), ColourScale(), None, None, max_side=100)
    assert big.shape == (PANEL_HEADER + 100, 4 * 50 + 3 * PANEL_GAP, 3)


def test_pick_images_returns_the_most_wrong_of_each_class():
    labels = [0, 0, 0, 1, 1, 1, 0, 1]
    scores = [0.1, 0.9, 0.5, 0.2, 0.95, 0.2, 0.9, 0.6]
    normal, anomalous = pick_images(labels, scores, 2)
    assert normal == [1, 6]  # highest normal scores; the tie keeps index order
    assert anomalous == [3, 5]  # lowest anomalous scores
    assert pick_images(labels, scores, 10) == ([1, 6, 2, 0], [3, 5, 7, 4])
    assert pick_images(labels, scores, 0) == ([], [])
    with pytest.raises(ValueError):
        pick_images(labels, scores, -1)
    with pytest.raises(ValueError, match="differ"):
        pick_images(labels, scores[:3], 1)


def test_curve_pngs_are_written_at_a_fixed_size(tmp_path):
    masks, maps = _case(3)
    labels = masks.reshape(4, -1).any(1)
    scores = maps.reshape(4, -1).max(1)
    paths = save_curves(tmp_path, "widget", labels, scores, masks, maps)
    assert sorted(paths) == ["pr", "pro", "roc"]
    for key, path in paths.items():
        assert path == tmp_path / f"widget_{key}.png"
        with Image.open(path) as im:
            assert im.size == (480, 400)
    only_normal = save_curves(tmp_path / "n", "n", [0, 0], [0.1, 0.2])  # undefined: still a PNG each
    assert all(p.is_file() for p in only_normal.values())


def test_centred_scale_of_a_calibrated_run():
    """ColourScale.centred: floor -> bottom colour, threshold -> middle, as far above as the floor is below
    -> top, on any range (knn's maps sit near 0.2-0.45, not [0, 1])."""
    scale = ColourScale.centred(0.2, 0.3)
    assert (scale.vmin, scale.vcenter) == (pytest.approx(0.2), 0.3) and scale.vmax == pytest.approx(0.4)
    np.testing.assert_allclose(scale.normalise([0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.9]),
                               [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0], atol=1e-9)
    flat = ColourScale.centred(0.5, 0.5)  # constant normal maps: a small span, still a valid scale
    assert flat.vmin < flat.vcenter == 0.5 < flat.vmax
