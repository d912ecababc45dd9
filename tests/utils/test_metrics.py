"""Metrics against hand-worked values, sklearn and a slow loop reference."""
import math
import warnings

import numpy as np
import pytest
from skimage import measure
from sklearn.metrics import (average_precision_score, f1_score,
                             precision_recall_curve, roc_auc_score)

from utils.metrics import (METRIC_KEYS, aupro, auroc, average_precision,
                           binary_metrics, compute_category_metrics, f1_max,
                           label_regions, resize_for_eval)


# --------------------------------------------------------------------------- #
# slow reference, straight from the MVTec AD definition
# --------------------------------------------------------------------------- #
def slow_aupro(masks, maps, fpr_limit):
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float64)
    regions = []  # (image index, boolean region mask)
    for i in range(masks.shape[0]):
        lab = measure.label(masks[i], connectivity=2)
        for k in range(1, lab.max() + 1):
            regions.append((i, lab == k))
    normal = ~masks
    if not regions or normal.sum() == 0:
        return math.nan
    points = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        pred = maps >= t
        fpr = (pred & normal).sum() / normal.sum()
        pro = np.mean([pred[i][reg].sum() / reg.sum() for i, reg in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:  # the segment crosses the limit: cut it there
            y_cut = y0 + (fpr_limit - x0) * (y1 - y0) / (x1 - x0)
            area += (fpr_limit - x0) * (y0 + y_cut) / 2
            break
    return area / fpr_limit


def _random_case(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 4))
    h, w = (int(v) for v in rng.integers(4, 11, size=2))
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        if rng.random() < 0.25:
            continue  # an image without defects
        kind = rng.integers(3)
        if kind == 0:  # scattered pixels: many single-pixel regions
            masks[i] = rng.random((h, w)) < 0.15
        elif kind == 1:  # a rectangle blob
            y0, x0 = rng.integers(0, h - 1), rng.integers(0, w - 1)
            masks[i, y0:y0 + rng.integers(1, 4), x0:x0 + rng.integers(1, 4)] = True
        else:  # two pixels touching only at a corner + noise
            y0, x0 = rng.integers(0, h - 1), rng.integers(0, w - 1)
            masks[i, y0, x0] = masks[i, y0 + 1, x0 + 1] = True
            masks[i] |= rng.random((h, w)) < 0.05
    if not masks.any():
        masks[0, 0, 0] = True
    if masks.all():
        masks[-1, -1, -1] = False
    levels = [3, 5, 10, 0][seed % 4]  # quantised scores -> many ties; 0 = continuous
    maps = rng.random(masks.shape) + 0.6 * masks * rng.random()
    if levels:
        maps = np.round(maps * levels) / levels
    if seed % 5 == 0:  # a single extreme pixel
        maps[tuple(rng.integers(0, s) for s in maps.shape)] = 1e6
    if seed % 7 == 0:
        maps = maps.astype(np.float32)
    fpr_limit = [0.3, 0.05, 0.1, 0.5, 1.0, 0.3, 0.2][seed % 7]
    return masks, maps, fpr_limit


@pytest.mark.parametrize("seed", range(40))
def test_aupro_matches_slow_reference(seed):
    masks, maps, limit = _random_case(seed)
    assert aupro(masks, maps, limit) == pytest.approx(slow_aupro(masks, maps, limit), abs=1e-6)


def test_compute_category_metrics_aupro_matches_standalone():
    for seed in range(10):
        masks, maps, limit = _random_case(seed)
        m = compute_category_metrics([0, 1], [0.1, 0.9], masks, maps, fpr_limit=limit)
        assert m["p_aupro"] == pytest.approx(aupro(masks, maps, limit), abs=1e-12)


# --------------------------------------------------------------------------- #
# hand-worked toy cases
# --------------------------------------------------------------------------- #
def test_binary_toy_without_ties():
    # descending: .8(+) .4(-) .35(+) .1(-);  P = N = 2
    # AUROC: pairs (+,-): .8>.4, .8>.1, .35>.1, .35<.4 -> 3/4
    # AP: recall .5 at precision 1 (t=.8), recall 1 at precision 2/3 (t=.35)
    #     -> .5*1 + .5*2/3 = 5/6
    # F1 = 2TP/(#pred + P): t=.8 2/3, t=.4 2/4, t=.35 4/5, t=.1 4/6 -> .8 at .35
    y, s = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert auroc(y, s) == pytest.approx(0.75, abs=1e-12)
    assert average_precision(y, s) == pytest.approx(5 / 6, abs=1e-12)
    f1, thr = f1_max(y, s)
    assert f1 == pytest.approx(0.8, abs=1e-12) and thr == 0.35


def test_binary_toy_with_ties():
    # runs: .9{+}, .5{+,-}, .2{+,-};  P = 3, N = 2
    # AUROC: + .9 beats both (2), + .5 beats .2 and ties .5 (1.5),
    #        + .2 ties .2 (0.5) -> 4/6
    # AP: each run adds recall 1/3 at precision 1, 2/3, 3/5 -> (1+2/3+3/5)/3 = 34/45
    # F1: 2/(1+3), 4/(3+3), 6/(5+3) -> .75 at .2
    y, s = [0, 1, 0, 1, 1], [0.2, 0.2, 0.5, 0.9, 0.5]
    assert auroc(y, s) == pytest.approx(2 / 3, abs=1e-12)
    assert average_precision(y, s) == pytest.approx(34 / 45, abs=1e-12)
    assert f1_max(y, s) == (pytest.approx(0.75, abs=1e-12), 0.2)


def test_constant_scores():
    y, s = [0, 1, 1, 0, 1], [0.3] * 5
    assert auroc(y, s) == 0.5 == roc_auc_score(y, s)
    assert average_precision(y, s) == pytest.approx(0.6, abs=1e-12)  # P / n
    assert f1_max(y, s) == (pytest.approx(0.75, abs=1e-12), 0.3)  # 2*3/(5+3)


# One image, one row of 8 pixels:
#   index  0    1    2    3    4    5    6    7
#   mask   A    A    .    .    .    .    .    B     (region A area 2, B area 1)
#   score .9   .4   .8   .1   .2   .4   .0   .6     (5 normal pixels)
# thresholds: .9 -> FPR 0,  PRO (1/2+0)/2 = .25
#             .8 -> FPR .2, PRO .25
#             .6 -> FPR .2, PRO (1/2+1)/2 = .75
#             .4 -> FPR .4, PRO 1   (normal and defect pixel tied: one sloped step)
#             .2, .1, .0 -> FPR .6, .8, 1 at PRO 1
TOY_MASK = np.array([[[1, 1, 0, 0, 0, 0, 0, 1]]], dtype=bool)
TOY_MAP = np.array([[[0.9, 0.4, 0.8, 0.1, 0.2, 0.4, 0.0, 0.6]]])


def test_aupro_toy_exact():
    # limit .3: .2*.25 + .1*(.75 + .875)/2 = .13125 (PRO at .3 interpolated = .875)
    #           / .3 = .4375
    assert aupro(TOY_MASK, TOY_MAP, 0.3) == pytest.approx(0.4375, abs=1e-12)
    # limit .2: the vertical step at FPR .2 adds no area: .2*.25 / .2 = .25
    assert aupro(TOY_MASK, TOY_MAP, 0.2) == pytest.approx(0.25, abs=1e-12)
    # limit 1: .05 + .2*(.75+1)/2 + .6*1 = .825
    assert aupro(TOY_MASK, TOY_MAP, 1.0) == pytest.approx(0.825, abs=1e-12)


def test_diagonal_touch_is_one_region():
    # (0,0),(0,1) and (1,2) touch only at a corner: one region of area 3 under
    # 8-connectivity (two regions, areas 2 and 1, under 4-connectivity).
    mask = np.zeros((1, 3, 4), dtype=bool)
    mask[0, 0, 0] = mask[0, 0, 1] = mask[0, 1, 2] = True
    assert label_regions(mask)[1] == 1
    assert measure.label(mask[0], connectivity=1).max() == 2
    # Only (1,2) is found before any normal pixel: PRO = 1/3 until FPR 1.
    # (Two regions would give (0 + 1)/2 = .5.)
    score = np.full(mask.shape, 0.5)
    score[0, 1, 2] = 1.0
    score[0, 0, :2] = 0.0
    assert aupro(mask, score) == pytest.approx(1 / 3, abs=1e-12)


def test_regions_do_not_cross_images():
    mask = np.ones((2, 2, 2), dtype=bool)
    mask[1, 0, 0] = False
    assert label_regions(mask)[1] == 2


def test_perfect_and_inverted_maps():
    masks, _, _ = _random_case(3)
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks, (~masks).astype(float)) == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------- #
# agreement with sklearn (random data with ties)
# --------------------------------------------------------------------------- #
def _sk_f1max(y, s):
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return f1.max()


@pytest.mark.parametrize("seed", range(25))
def test_binary_metrics_match_sklearn(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(2, 3000))
    y = rng.random(n) < rng.uniform(0.02, 0.9)
    y[0], y[1] = True, False
    s = rng.random(n) + y * rng.uniform(0, 1)
    if seed % 3:
        s = np.round(s * [4, 20, 200][seed % 3 - 1])  # ties
    if seed % 2:
        s = s.astype(np.float32)
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-9)
    f1, thr = f1_max(y, s)
    assert f1 == pytest.approx(_sk_f1max(y, s), abs=1e-9)
    assert f1_score(y, s >= thr) == pytest.approx(f1, abs=1e-12)


def test_pixel_scale_matches_sklearn():
    rng = np.random.default_rng(7)
    y = rng.random(300_000) < 0.03
    s = (rng.normal(size=y.size) + 1.5 * y).astype(np.float32)
    s[::3] = np.round(s[::3], 2)  # many ties too
    got = binary_metrics(y, s)
    assert got["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert got["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert got["f1max"] == pytest.approx(_sk_f1max(y, s), abs=1e-9)


# --------------------------------------------------------------------------- #
# degenerate inputs: NaN, never a crash or a warning
# --------------------------------------------------------------------------- #
def test_single_class_gives_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for y in ([0, 0, 0], [1, 1, 1], []):
            s = np.linspace(0, 1, len(y))
            assert math.isnan(auroc(y, s))
            assert math.isnan(average_precision(y, s))
            assert all(math.isnan(v) for v in f1_max(y, s))
        empty = np.zeros((2, 4, 4), dtype=bool)
        assert math.isnan(aupro(empty, np.random.rand(2, 4, 4)))
        assert math.isnan(aupro(~empty, np.random.rand(2, 4, 4)))
        m = compute_category_metrics([1, 1], [0.2, 0.3], empty, np.random.rand(2, 4, 4))
        assert list(m) == list(METRIC_KEYS)
        assert all(math.isnan(v) for v in m.values())


def test_category_metrics_keys_and_ranges():
    rng = np.random.default_rng(11)
    masks = np.zeros((4, 9, 9), dtype=bool)
    masks[1, 2:5, 3:7] = masks[3, 6:, :2] = masks[3, 0, 8] = True
    maps = np.round(rng.random(masks.shape) + 0.5 * masks, 1)
    labels = masks.any(axis=(1, 2))
    m = compute_category_metrics(labels, maps.max(axis=(1, 2)), masks, maps)
    assert list(m) == list(METRIC_KEYS)
    flat_y, flat_s = masks.ravel(), maps.ravel()
    assert m["p_auroc"] == pytest.approx(roc_auc_score(flat_y, flat_s), abs=1e-9)
    assert m["p_ap"] == pytest.approx(average_precision_score(flat_y, flat_s), abs=1e-9)
    # every metric against its independent reference (the image ones on the image scores passed in)
    img_y, img_s = labels, maps.max(axis=(1, 2))
    assert m["i_auroc"] == pytest.approx(roc_auc_score(img_y, img_s), abs=1e-9)
    assert m["i_ap"] == pytest.approx(average_precision_score(img_y, img_s), abs=1e-9)
    assert m["i_f1max"] == pytest.approx(_sk_f1max(img_y, img_s), abs=1e-9)
    assert m["p_f1max"] == pytest.approx(_sk_f1max(flat_y, flat_s), abs=1e-9)
    assert m["p_aupro"] == pytest.approx(slow_aupro(masks, maps, 0.3), abs=1e-9)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="NaN"):
        auroc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="differ in size"):
        auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(TOY_MASK, TOY_MAP, 0.0)
    with pytest.raises(ValueError, match=r"\(1, 1, 8\)"):
        aupro(TOY_MASK, TOY_MAP[:, :, :4])


# --------------------------------------------------------------------------- #
# evaluation resolution
# --------------------------------------------------------------------------- #
def test_resize_for_eval():
    masks = np.zeros((2, 8, 8), dtype=np.uint8)
    masks[0, 2:6, 2:6] = 1
    maps = np.random.default_rng(0).random((2, 4, 4)).astype(np.float32)
    m, a = resize_for_eval(masks, maps, 16)
    assert m.shape == a.shape == (2, 16, 16) and m.dtype == bool and a.dtype == np.float32
    assert m[0, 4:12, 4:12].all() and m.sum() == 64
    # bilinear, align_corners=False keeps the mean of a smooth upsampling close
    assert a.min() >= maps.min() - 1e-6 and a.max() <= maps.max() + 1e-6
    m0, a0 = resize_for_eval(masks, np.zeros((2, 8, 8)), 0)
    assert m0.shape == (2, 8, 8) and m0.dtype == bool and (m0 == masks.astype(bool)).all()
    with pytest.raises(ValueError, match=r"\(2, 4, 4\).*\(2, 8, 8\)"):
        resize_for_eval(masks, maps, 0)
