"""Rotation of the references (models/augment.py) against torch.rot90 per image, a slow per-pixel
reference of the definition for other angles, and OpenCV's warpAffine (AnomalyDINO's call)."""
import math

import cv2
import numpy as np
import pytest
import torch

from models.augment import ANOMALYDINO_ROTATIONS, rotate_images


def test_right_angles_equal_rot90_per_image_image_major():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 10, 10, generator=g)
    out = rotate_images(x, [0, 90, 180, 270])
    assert out.shape == (12, 3, 10, 10)
    for b in range(3):
        for i, k in enumerate(range(4)):
            torch.testing.assert_close(out[4 * b + i], torch.rot90(x[b], k, dims=(-2, -1)), atol=1e-6, rtol=0)
    # a non-square image turned half-way round is the same picture upside down and mirrored
    y = torch.rand(2, 3, 6, 10, generator=g)
    torch.testing.assert_close(rotate_images(y, [180]), torch.rot90(y, 2, dims=(-2, -1)), atol=1e-6, rtol=0)


def test_no_angles_leave_the_references_as_given():
    x = torch.rand(2, 3, 8, 8)
    assert rotate_images(x, []) is x


def _reflect(v: float, size: int) -> float:
    """Mirror a pixel coordinate into [-0.5, size - 0.5] (the edge pixel repeated)."""
    lo, span = -0.5, float(size)
    v = (v - lo) % (2 * span)
    return lo + (v if v <= span else 2 * span - v)


def slow_rotate(img: np.ndarray, angle: float) -> np.ndarray:
    """Per pixel, from the definition: output pixel p' shows the input at R^-1 p' about the centre,
    R a counter-clockwise turn on screen (y down), bilinear between the four nearest pixels."""
    C, H, W = img.shape
    cy, cx = (H - 1) / 2, (W - 1) / 2
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    out = np.zeros_like(img)
    for i in range(H):
        for j in range(W):
            x, y = j - cx, i - cy
            sx, sy = _reflect(c * x - s * y + cx, W), _reflect(s * x + c * y + cy, H)
            x0, y0 = math.floor(sx), math.floor(sy)
            fx, fy = sx - x0, sy - y0
            for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
                for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
                    if wx * wy:
                        out[:, i, j] += wx * wy * img[:, min(max(yy, 0), H - 1), min(max(xx, 0), W - 1)]
    return out


@pytest.mark.parametrize("angle", [45, 135, 30, -60])
def test_any_angle_matches_the_per_pixel_definition(angle):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 9, 12, generator=g, dtype=torch.float64)
    got = rotate_images(x, [angle])[0].numpy()
    np.testing.assert_allclose(got, slow_rotate(x[0].numpy(), angle), atol=1e-9)


def test_direction_and_centre_agree_with_opencv():
    """cv2.warpAffine with getRotationMatrix2D, AnomalyDINO's call (src/utils.py, rotate_image), about
    the true centre ((W-1)/2, (H-1)/2; theirs is W/2, H/2) with edge-repeating reflection; OpenCV
    interpolates with 1/32 weights, hence the tolerance."""
    rng = np.random.default_rng(2)
    img = cv2.GaussianBlur(rng.random((32, 32, 3)).astype(np.float32), (0, 0), 2)
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    out = rotate_images(x, ANOMALYDINO_ROTATIONS)
    assert out.shape[0] == 8
    for i, angle in enumerate(ANOMALYDINO_ROTATIONS):
        m = cv2.getRotationMatrix2D((15.5, 15.5), angle, 1.0)
        ref = cv2.warpAffine(img, m, (32, 32), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        np.testing.assert_allclose(out[i].permute(1, 2, 0).numpy(), ref, atol=0.02)
        if angle % 180:  # the other direction would differ clearly
            wrong = cv2.warpAffine(img, cv2.getRotationMatrix2D((15.5, 15.5), -angle, 1.0), (32, 32),
                                   flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            assert np.abs(out[i].permute(1, 2, 0).numpy() - wrong).mean() > 0.02
