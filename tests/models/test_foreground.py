"""The zero-shot PCA foreground mask (models/foreground.py) on a hand-made token image whose
foreground is known, and against a slow per-image reference of AnomalyDINO's rule (numpy SVD, the
centre-crop sign test written out, OpenCV morphology on the patch grid)."""
import math

import cv2
import numpy as np
import pytest
import torch

from models.foreground import first_component, foreground_mask


def object_image(grid=(16, 16), box=(5, 11, 5, 11), channels=128, noise=0.05, seed=0):
    """Unit tokens: one direction inside `box` (the object), an orthogonal one outside (background)."""
    g = torch.Generator().manual_seed(seed)
    obj, bg = torch.zeros(channels), torch.zeros(channels)
    obj[0], bg[1] = 1.0, 1.0
    inside = torch.zeros(grid, dtype=torch.bool)
    r0, r1, c0, c1 = box
    inside[r0:r1, c0:c1] = True
    tokens = torch.where(inside.reshape(-1, 1), obj, bg) + noise * torch.randn(grid[0] * grid[1], channels, generator=g)
    return torch.nn.functional.normalize(tokens, dim=-1)[None], inside


def test_centred_object_is_the_foreground_grown_by_one_patch():
    tokens, inside = object_image()
    mask = foreground_mask(tokens, (16, 16), threshold=10.0)[0]
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[4:12, 4:12] = True  # the 6x6 object dilated by the 3x3 kernel; closing changes nothing
    assert torch.equal(mask, expected)
    assert (~mask).sum() == 256 - 64  # the background patches, which the method scores 0


def test_the_result_does_not_depend_on_the_principal_axis_sign():
    # negated tokens negate every projection: the object is then on the negative side and the
    # centre-crop test has to turn to it
    tokens, _ = object_image(seed=1)
    assert torch.equal(foreground_mask(tokens, (16, 16)), foreground_mask(-tokens, (16, 16)))


def test_a_side_that_misses_the_centre_crop_is_swapped_for_the_other():
    # a frame around an empty middle, tokens chosen so that the frame lies on the positive side of the
    # axis (its largest entry, channel 1, is positive) but stays below the threshold, while the middle
    # is far on the negative side: the positive side keeps nothing of the centre crop, so the rule
    # takes the negated scores and the middle becomes the foreground (their rule for the case the
    # sign of the first component points at the background)
    grid, c = (16, 16), 128
    frame = torch.ones(grid, dtype=torch.bool)
    frame[4:12, 4:12] = False
    a, b = torch.zeros(c), torch.zeros(c)
    a[0], a[1] = 0.6, 0.8
    b[0] = 1.0
    tokens = torch.where(frame.reshape(-1, 1), a, b)[None]
    score = first_component(tokens)[0].reshape(grid) * math.sqrt(c)
    assert (score[frame] > 0).all() and (score[frame] < 5).all() and (score[~frame] < -5).all()
    mask = foreground_mask(tokens, grid, threshold=5.0)[0]
    expected = torch.zeros(grid, dtype=torch.bool)
    expected[3:13, 3:13] = True
    assert torch.equal(mask, expected)


def test_an_empty_mask_keeps_every_patch():
    tokens, _ = object_image()
    assert foreground_mask(tokens, (16, 16), threshold=1e6).all()


def slow_mask(tokens: np.ndarray, grid, threshold: float) -> np.ndarray:
    """One image (N, C), from the definition."""
    n, c = tokens.shape
    x = tokens.astype(np.float64) * math.sqrt(c)
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    axis = vt[0] if vt[0][np.argmax(np.abs(vt[0]))] > 0 else -vt[0]
    pc = (x @ axis).reshape(grid)
    h, w = grid
    r0, r1, c0, c1 = int(h * 0.2), int(h * 0.8), int(w * 0.2), int(w * 0.8)
    kept = sum(pc[i, j] > threshold for i in range(r0, r1) for j in range(c0, c1))
    mask = (pc > threshold) if kept > 0.35 * (r1 - r0) * (c1 - c0) else (-pc > threshold)
    k = np.ones((3, 3), np.uint8)
    mask = cv2.dilate(mask.astype(np.uint8), k)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, k).astype(bool)
    return mask if mask.any() else np.ones(grid, bool)


@pytest.mark.parametrize("grid", [(12, 12), (9, 14)])
def test_matches_the_slow_reference_on_varied_images(grid):
    g = torch.Generator().manual_seed(3)
    n = grid[0] * grid[1]
    flips = set()
    for trial in range(12):
        # two clusters of random size and place plus noise: both signs of the rule, and empty masks, occur
        a, b = torch.randn(2, 48, generator=g)
        where = torch.rand(grid, generator=g) < torch.rand(1, generator=g).item()
        tokens = torch.where(where.reshape(-1, 1), a, b) + 0.6 * torch.randn(n, 48, generator=g)
        tokens = torch.nn.functional.normalize(tokens, dim=-1)[None]
        for threshold in (0.5, 2.0, 4.0):
            got = foreground_mask(tokens, grid, threshold)[0].numpy()
            ref = slow_mask(tokens[0].numpy(), grid, threshold)
            np.testing.assert_array_equal(got, ref, err_msg=f"trial {trial}, threshold {threshold}")
            flips.add(bool(got.all()))
    assert flips == {True, False}  # some images kept everything, others were masked


def test_first_component_is_the_centred_projection_with_sklearn_sign():
    from sklearn.decomposition import PCA

    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 60, 16, generator=g) * torch.linspace(3, 0.1, 16)
    got = first_component(x)
    for b in range(2):
        ref = PCA(n_components=1, svd_solver="full").fit_transform(x[b].numpy())[:, 0]
        np.testing.assert_allclose(got[b].numpy(), ref, atol=1e-4)
