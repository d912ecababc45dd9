"""Reference augmentation by rotation (AnomalyDINO's few-shot setting): every reference image is
added to the memory bank at several angles, so parts that lie rotated in a test image still find
a matching normal patch.

One `grid_sample` call rotates all images at all angles. Angles are in degrees, counter-clockwise
as displayed (OpenCV's getRotationMatrix2D convention; 90 equals torch.rot90(x, 1, (-2, -1))), about
the image centre, at the input size; what a rotation brings in from outside the image is filled
by reflection at the border (OpenCV: BORDER_REFLECT_101, mirrored about the edge pixel; here the
edge pixel is repeated, grid_sample's "reflection").
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

# AnomalyDINO's angles (src/utils.py, augment_image): the original plus seven rotations
ANOMALYDINO_ROTATIONS = (0, 45, 90, 135, 180, 225, 270, 315)


def _thetas(degrees: torch.Tensor, height: int, width: int, dtype=torch.float32) -> torch.Tensor:
    """affine_grid matrices (N, 2, 3) turning images counter-clockwise on screen by `degrees` (N,)."""
    r = torch.deg2rad(degrees.detach().to("cpu", torch.float64))
    c, s = torch.cos(r), torch.sin(r)
    # multiples of 90 degrees exactly: sampling then lands on pixel centres (an exact rot90)
    c, s = c.masked_fill(c.abs() < 1e-12, 0.0), s.masked_fill(s.abs() < 1e-12, 0.0)
    # output pixel (x, y) samples the input at R^-1 (x, y) in pixel units about the centre; y points
    # down, so a counter-clockwise turn on screen samples at (c x - s y, s x + c y). In grid_sample's
    # normalised coordinates (x / (W / 2), y / (H / 2)) the aspect ratio enters the off-diagonal.
    zero = torch.zeros_like(c)
    theta = torch.stack([torch.stack([c, -s * height / width, zero], -1),
                         torch.stack([s * width / height, c, zero], -1)], -2)
    return theta.to(dtype)


def rotation_grids(n: int, angles: Sequence[float], height: int, width: int,
                   device=None, dtype=torch.float32) -> torch.Tensor:
    """affine_grid sampling grids (n * A, H, W, 2), image-major (image 0 at every angle, then image 1, ...)."""
    theta = _thetas(torch.tensor([float(a) for a in angles]), height, width, dtype).to(device).repeat(n, 1, 1)
    return F.affine_grid(theta, [n * len(angles), 1, height, width], align_corners=False)


def rotate_each(images: torch.Tensor, degrees: torch.Tensor, mode: str = "nearest",
                padding: str = "zeros") -> torch.Tensor:
    """Image i of (B, C, H, W) turned by degrees[i], same size, one grid_sample for the batch. The
    defaults (nearest, black outside) are torchvision's RandomRotation, which SubspaceAD's authors used."""
    b, _, h, w = images.shape
    theta = _thetas(degrees, h, w).to(images.device)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode=padding, align_corners=False)


def rotate_images(images: torch.Tensor, angles: Sequence[float]) -> torch.Tensor:
    """(B, C, H, W) images -> (B * A, C, H, W): each image at each angle, image-major, bilinear."""
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    angles = list(angles)
    if not angles:
        return images
    B, C, H, W = images.shape
    grid = rotation_grids(B, angles, H, W, images.device, images.dtype if images.is_floating_point() else torch.float32)
    src = images.repeat_interleave(len(angles), dim=0)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
