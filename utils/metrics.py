"""Exact anomaly-detection metrics on numpy arrays.

Every metric here is computed from ONE ascending ``np.sort`` of all scores.
Equal scores form a run and each run is one threshold.  Counts "at or above"
a threshold come from binary searches into the sorted scores (left and right
end of the tie run), and positive counts / PRO weights from cumulative sums
over the runs that contain positives.  There is no Python loop over
thresholds or defect regions: pixel metrics over ~10 million pixels take
about 0.1 s on one CPU core, and ties are handled exactly.

Undefined metrics: when the labels contain a single class (or no defect
region / no anomaly-free pixel for AUPRO) the metric has no meaning and the
functions return ``float('nan')``; reports print it as 'n/a' and leave it out
of means.  A NaN score is an error (ValueError) because it has no rank.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage

NAN = float("nan")

METRIC_KEYS = (
    "i_auroc", "i_ap", "i_f1max", "i_f1_threshold",
    "p_auroc", "p_ap", "p_f1max", "p_f1_threshold", "p_aupro",
)

# 8-connectivity inside each image, none across images: labelling the whole
# (N, H, W) stack in one call keeps region ids unique over the category.
_STACK_8CONN = np.zeros((3, 3, 3), dtype=bool)
_STACK_8CONN[1] = True
_CONN8 = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------- #
# input checks
# --------------------------------------------------------------------------- #
def _as_scores(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == np.float16 or not np.issubdtype(a.dtype, np.floating):
        # float16 is widened (no fast sort for it), ints/bools become float64;
        # float32/float64 are kept as given so ties are exactly the caller's.
        a = a.astype(np.float32 if a.dtype == np.float16 else np.float64)
    if a.size and np.isnan(a.min()):  # min propagates NaN, no n-sized temporary
        raise ValueError(f"{name} contains NaN; every score must be rankable")
    return a


def _as_binary(x) -> np.ndarray:
    a = np.asarray(x)
    return a if a.dtype == bool else a > 0


def _pair_1d(labels, scores):
    y = _as_binary(labels).ravel()
    s = _as_scores(scores, "scores").ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in size: {y.shape} vs {s.shape}")
    return y, s


def _pair_maps(masks, maps):
    m = _as_binary(masks)
    a = _as_scores(maps, "maps")
    if m.ndim == 2:
        m = m[None]
    if a.ndim == 2:
        a = a[None]
    if m.shape != a.shape or m.ndim != 3:
        raise ValueError(
            f"masks {tuple(m.shape)} and maps {tuple(a.shape)} must both be (N, H, W) "
            "with the same shape; use resize_for_eval first")
    return m, a


# --------------------------------------------------------------------------- #
# the shared sort
# --------------------------------------------------------------------------- #
class _Runs(NamedTuple):
    """Runs of equal scores that contain at least one positive, highest first.

    Every other threshold only adds negatives: TP, PRO stay constant while FP
    grows, so those points lie on straight ROC/PRO segments, never carry the
    best F1 and add nothing to AP; the curves are exact with these runs only.
    """
    value: np.ndarray   # distinct positive scores, descending
    count: np.ndarray   # positives in the run
    tp_ge: np.ndarray   # positives with score >= value
    n_ge: np.ndarray    # all items with score >= value
    n_gt: np.ndarray    # all items with score > value
    w_ge: np.ndarray | None  # summed weights of positives with score >= value


def _runs(scores: np.ndarray, positive: np.ndarray, weights=None) -> _Runs:
    """One ascending np.sort of all scores, then binary searches.

    Plain ``np.sort`` (SIMD, no index array) is ~10x faster than argsort, and
    only the positives (a small share of the pixels) need an argsort to carry
    their weights.  Searching each positive run value on the left and right of
    the sorted scores gives the counts at the start and end of its tie run.
    """
    s = np.sort(scores, kind="quicksort")
    pos = scores[positive]
    if weights is None:
        ps, pw = np.sort(pos)[::-1], None
    else:
        order = np.argsort(pos)[::-1]
        ps, pw = pos[order], np.asarray(weights, dtype=np.float64)[order]
    new_run = np.empty(ps.size, dtype=bool)
    new_run[:1] = True
    np.not_equal(ps[1:], ps[:-1], out=new_run[1:])
    starts = np.flatnonzero(new_run)
    value = ps[starts]
    count = np.diff(np.append(starts, ps.size))
    asc = value[::-1]  # ascending queries let searchsorted reuse its bounds
    n = s.size
    n_ge = n - np.searchsorted(s, asc, side="left")[::-1]
    n_gt = n - np.searchsorted(s, asc, side="right")[::-1]
    w_ge = None if pw is None else np.cumsum(np.add.reduceat(pw, starts))
    return _Runs(value, count, np.cumsum(count), n_ge, n_gt, w_ge)


def _binary_from_runs(r: _Runs, n_pos: int, n_neg: int):
    """(auroc, ap, f1max, f1_threshold); NaN when one class is missing."""
    if n_pos == 0 or n_neg == 0:
        return NAN, NAN, NAN, NAN
    fp_ge = r.n_ge - r.tp_ge
    fp_gt = r.n_gt - (r.tp_ge - r.count)
    # AUROC = P(score_pos > score_neg) + P(tie) / 2, the exact area under the
    # ROC trapezoids; for a run, N - fp_ge negatives lie below it and
    # fp_ge - fp_gt are tied with it.  Integer sum, one rounding at the end.
    twice_u = int(np.sum(r.count * (2 * n_neg - fp_ge - fp_gt)))
    auroc = twice_u / (2 * n_pos * n_neg)
    # AP = sum over thresholds of (recall increase) x precision (sklearn).
    ap = float(np.sum(r.count * (r.tp_ge / r.n_ge))) / n_pos
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (#predicted + #positives)
    f1 = 2.0 * r.tp_ge / (r.n_ge + n_pos)
    best = int(np.argmax(f1))  # first = highest threshold among equal F1
    return auroc, ap, float(f1[best]), float(r.value[best])


def _binary(labels, scores):
    y, s = _pair_1d(labels, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return NAN, NAN, NAN, NAN
    return _binary_from_runs(_runs(s, y), n_pos, n_neg)


# --------------------------------------------------------------------------- #
# image / pixel level binary metrics
# --------------------------------------------------------------------------- #
def auroc(labels, scores) -> float:
    """Area under the ROC curve (same value as sklearn ``roc_auc_score``).

    Tied scores form one threshold, so constant scores give 0.5.
    Returns NaN when ``labels`` holds only one class (AUROC undefined).
    """
    return _binary(labels, scores)[0]


def average_precision(labels, scores) -> float:
    """Average precision, sklearn ``average_precision_score`` semantics:
    sum over distinct thresholds of (recall increase) x precision.
    Returns NaN when ``labels`` holds only one class.
    """
    return _binary(labels, scores)[1]


def f1_max(labels, scores) -> tuple[float, float]:
    """Best F1 over all distinct score thresholds and the threshold achieving it.

    A sample is predicted anomalous when ``score >= threshold``; the value
    equals the maximum of 2PR/(P+R) over sklearn's precision_recall_curve.
    Among equal F1 values the highest threshold is returned.
    Returns (NaN, NaN) when ``labels`` holds only one class.
    """
    _, _, f1, thr = _binary(labels, scores)
    return f1, thr


def binary_metrics(labels, scores) -> dict:
    """AUROC, AP, F1-max and its threshold from a single sort."""
    a, p, f, t = _binary(labels, scores)
    return {"auroc": a, "ap": p, "f1max": f, "f1_threshold": t}


# --------------------------------------------------------------------------- #
# AUPRO
# --------------------------------------------------------------------------- #
def label_regions(masks) -> tuple[np.ndarray, int]:
    """Connected defect regions, 8-connectivity, per image of an (N, H, W) stack.

    Returns (labels, n_regions); labels are 1..n_regions, unique across the
    stack (0 = anomaly-free), so two blobs touching only at a corner are ONE
    region, as in the MVTec AD evaluation.
    """
    m = _as_binary(masks)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"masks must be (N, H, W) or (H, W), got shape {tuple(m.shape)}")
    lab, n = ndimage.label(m, structure=_STACK_8CONN)
    return lab, int(n)


def _defect_region_ids(m: np.ndarray) -> tuple[np.ndarray, int]:
    """Region id (1..n) of every defect pixel in C order, and n.

    Same regions as label_regions, but image by image into one reused buffer:
    a full-size int32 label stack is the costliest allocation of the metric.
    """
    ids, n = [], 0
    buf = np.empty(m.shape[1:], dtype=np.int32)
    for i in np.flatnonzero(m.reshape(m.shape[0], -1).any(axis=1)):
        k = ndimage.label(m[i], structure=_CONN8, output=buf)
        ids.append(buf[m[i]] + n)
        n += int(k)
    return (np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)), n


def _cut_curve(x: np.ndarray, y: np.ndarray, limit: float) -> tuple[np.ndarray, np.ndarray]:
    """The points of (x, y) with x <= limit, ending at exactly ``limit``.

    x is non-decreasing, starts at 0 and ends at 1 >= limit; the curve is
    cut at ``limit`` by linear interpolation inside the crossing segment.
    """
    k = int(np.searchsorted(x, limit, side="right"))  # points with x <= limit
    xs, ys = x[:k], y[:k]
    if xs[-1] < limit and k < x.size:
        x0, x1, y0, y1 = x[k - 1], x[k], y[k - 1], y[k]
        xs = np.append(xs, limit)
        ys = np.append(ys, y0 + (limit - x0) * (y1 - y0) / (x1 - x0))
    return xs, ys


def _partial_area(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under (x, y) for x in [0, limit], divided by limit."""
    xs, ys = _cut_curve(x, y, limit)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1])) / 2.0) / limit


def _check_limit(fpr_limit: float) -> float:
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return fpr_limit


def _region_weights(lab_of_pos: np.ndarray, n_regions: int) -> np.ndarray:
    """Weight of each defect pixel in PRO: 1 / (area of its region * n_regions)."""
    area = np.bincount(lab_of_pos, minlength=n_regions + 1).astype(np.float64)
    return 1.0 / (area * n_regions)[lab_of_pos]


def _pro_points(r: _Runs, n_normal: int) -> tuple[np.ndarray, np.ndarray]:
    """The full PRO curve (FPR, PRO) from (0, 0) to (1, PRO at the lowest defect score)."""
    # Each run of equal scores is one threshold.  Just above a run the curve
    # is at (FP > v, PRO > v), at the run it is at (FP >= v, PRO >= v); between
    # runs only normal pixels enter, a horizontal segment, so these two points
    # per run plus (0, 0) and (1, 1) give exactly the full PRO curve.
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
    return fpr, pro


def _aupro_from_runs(r: _Runs, n_normal: int, fpr_limit: float) -> float:
    return _partial_area(*_pro_points(r, n_normal), fpr_limit)


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD).

    masks: (N, H, W) bool / 0-1 ground truth; maps: (N, H, W) scores.
    Regions are the 8-connected components of each mask.  At every distinct
    score t: FPR(t) = share of all anomaly-free pixels of the category with
    score >= t; PRO(t) = mean over all regions of the share of the region's
    pixels with score >= t.  The curve starts at (0, 0); PRO is integrated
    over FPR in [0, fpr_limit] with the trapezoid rule (linear interpolation
    at fpr_limit) and divided by fpr_limit, so a perfect map scores 1.
    Returns NaN when there is no defect region or no anomaly-free pixel.
    """
    fpr_limit = _check_limit(fpr_limit)
    points = _pro_curve_points(masks, maps)
    return NAN if points is None else _partial_area(*points, fpr_limit)


def _pro_curve_points(masks, maps) -> tuple[np.ndarray, np.ndarray] | None:
    """The full PRO curve of a category's maps (see _pro_points); None when there is no defect
    region or no anomaly-free pixel. Shared by ``aupro`` and ``pro_curve``."""
    m, a = _pair_maps(masks, maps)
    region_ids, n_regions = _defect_region_ids(m)
    n_normal = m.size - region_ids.size
    if n_regions == 0 or n_normal == 0:
        return None
    w = _region_weights(region_ids, n_regions)
    return _pro_points(_runs(a.ravel(), m.ravel(), w), n_normal)


# --------------------------------------------------------------------------- #
# curves: the exact points the metrics above integrate, for plots
# --------------------------------------------------------------------------- #
def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray] | None:
    """(FPR, TPR) from (0, 0) to (1, 1); None when ``labels`` holds one class.

    Two points per run of tied positive scores (just above the run, and at
    it), so a tie is the diagonal segment AUROC credits half; the trapezoid
    area under these points is ``auroc``.
    """
    y, s = _pair_1d(labels, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    r = _runs(s, y)
    fp_ge = r.n_ge - r.tp_ge
    fp_gt = r.n_gt - (r.tp_ge - r.count)
    fpr = np.empty(2 * r.value.size + 2)
    tpr = np.empty_like(fpr)
    fpr[0], tpr[0] = 0.0, 0.0
    fpr[1:-1:2], tpr[1:-1:2] = fp_gt / n_neg, (r.tp_ge - r.count) / n_pos
    fpr[2:-1:2], tpr[2:-1:2] = fp_ge / n_neg, r.tp_ge / n_pos
    fpr[-1], tpr[-1] = 1.0, 1.0
    return fpr, tpr


def pr_curve(labels, scores) -> tuple[np.ndarray, np.ndarray] | None:
    """(recall, precision) at every positive score run, highest threshold
    first, preceded by (0, 1); None when ``labels`` holds one class.

    ``average_precision`` is the sum of recall steps times the precision at
    the step's end, so plot it as a step curve (matplotlib ``where='pre'``).
    """
    y, s = _pair_1d(labels, scores)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        return None
    r = _runs(s, y)
    recall = np.concatenate(([0.0], r.tp_ge / n_pos))
    precision = np.concatenate(([1.0], r.tp_ge / r.n_ge))
    return recall, precision


def pro_curve(masks, maps, fpr_limit: float = 0.3) -> tuple[np.ndarray, np.ndarray] | None:
    """(FPR, PRO) from (0, 0) to FPR = ``fpr_limit`` exactly, the part of the
    curve ``aupro`` integrates; None when there is no defect region or no
    anomaly-free pixel."""
    fpr_limit = _check_limit(fpr_limit)
    points = _pro_curve_points(masks, maps)
    return None if points is None else _cut_curve(*points, fpr_limit)


# --------------------------------------------------------------------------- #
# one category
# --------------------------------------------------------------------------- #
def compute_category_metrics(image_labels, image_scores, pixel_masks, pixel_maps,
                             fpr_limit: float = 0.3) -> dict:
    """All metrics of one category.

    image_labels (N,), image_scores (N,); pixel_masks / pixel_maps (N, H, W)
    at the evaluation resolution (see resize_for_eval).  Pixel metrics pool
    all pixels of all N images; pixel AUROC/AP/F1 and AUPRO share one sort.
    Returns floats in [0, 1] (thresholds in score units) or NaN if undefined.
    """
    fpr_limit = _check_limit(fpr_limit)
    img = binary_metrics(image_labels, image_scores)
    m, a = _pair_maps(pixel_masks, pixel_maps)
    n_pos = int(m.sum())
    n_neg = m.size - n_pos
    if n_pos and n_neg:
        flat_m = m.ravel()
        region_ids, n_regions = _defect_region_ids(m)
        w = _region_weights(region_ids, n_regions)
        r = _runs(a.ravel(), flat_m, w)
        p_auroc, p_ap, p_f1, p_thr = _binary_from_runs(r, n_pos, n_neg)
        p_aupro = _aupro_from_runs(r, n_neg, fpr_limit)
    else:
        p_auroc = p_ap = p_f1 = p_thr = p_aupro = NAN
    return {
        "i_auroc": float(img["auroc"]),
        "i_ap": float(img["ap"]),
        "i_f1max": float(img["f1max"]),
        "i_f1_threshold": float(img["f1_threshold"]),
        "p_auroc": float(p_auroc),
        "p_ap": float(p_ap),
        "p_f1max": float(p_f1),
        "p_f1_threshold": float(p_thr),
        "p_aupro": float(p_aupro),
    }


# --------------------------------------------------------------------------- #
# evaluation resolution
# --------------------------------------------------------------------------- #
def resize_for_eval(masks, maps, eval_size: int):
    """Bring masks and maps to the evaluation resolution.

    eval_size > 0: maps are resized bilinearly (align_corners=False) and masks
    with nearest neighbour to (eval_size, eval_size); masks are then binarised
    (> 0.5).  eval_size == 0: both are kept as they are, and maps must already
    have the mask resolution.

    The resolution is part of the protocol: the authors evaluated at 240x240.
    Pixel metrics change with it: downsampling shrinks or erases thin and
    small defect regions (each region weighs the same in PRO) and changes the
    balance of normal vs defect pixels, so only compare numbers obtained at
    the same eval_size.

    Returns (masks bool (N, S, S), maps float32 (N, S, S)) as numpy arrays.
    """
    import torch
    import torch.nn.functional as F

    def _np(x):
        return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

    m, a = _np(masks), _np(maps)
    if m.ndim == 2:
        m = m[None]
    if a.ndim == 2:
        a = a[None]
    if m.ndim != 3 or a.ndim != 3 or m.shape[0] != a.shape[0]:
        raise ValueError(f"masks {tuple(m.shape)} and maps {tuple(a.shape)} must be "
                         "(N, H, W) stacks with the same N")
    eval_size = int(eval_size)
    if eval_size < 0:
        raise ValueError(f"eval_size must be >= 0, got {eval_size}")
    if eval_size == 0:
        if m.shape != a.shape:
            raise ValueError(
                f"eval_size=0 keeps the original resolution, but maps {tuple(a.shape)} do not "
                f"match masks {tuple(m.shape)}; upsample the maps to the mask size or set eval_size")
        return _as_binary(m), a.astype(np.float32, copy=False)
    size = (eval_size, eval_size)
    with torch.no_grad():
        ta = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[:, None]
        if ta.shape[-2:] != size:
            ta = F.interpolate(ta, size=size, mode="bilinear", align_corners=False)
        tm = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[:, None]
        if tm.shape[-2:] != size:
            tm = F.interpolate(tm, size=size, mode="nearest")
    return (tm[:, 0] > 0.5).numpy(), ta[:, 0].numpy()
