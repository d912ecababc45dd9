"""Zero-shot foreground mask from the first principal component of an image's own patch tokens
(AnomalyDINO, `compute_background_mask` in src/backbones.py), batched.

Per image: centre its N tokens, project them on their first principal axis, keep the patches whose
score exceeds `threshold`; if that keeps at most 35 % of the central crop (20 % border cut on every
side), the object is taken to lie on the other side and the patches whose negated score exceeds
`threshold` are kept instead; then the mask is dilated (3 x 3) and closed (3 x 3) to fill small holes
and enlarge it slightly. Background patches get anomaly 0.

Where this differs from their code, and why:
- Their threshold (10) applies to DINOv2's raw last-layer tokens; our backbones hand out unit-length
  tokens, so they are scaled by sqrt(C) first: the length a LayerNorm output of C channels has
  before its affine gain, so that the threshold keeps its meaning for DINOv2 up to that gain and
  stays comparable across backbones of other widths.
- The principal axis comes from an exact symmetric eigendecomposition (theirs: sklearn's
  randomized PCA); its sign is fixed as sklearn >= 1.5 fixes it (the axis' largest-magnitude entry
  positive). The centre-crop rule makes the result rarely depend on it.
- Their dilation and closing run on the (N, 1) column of flattened tokens, i.e. along the row-major
  token order only (neighbours wrap across row ends); we run them on the 2-D patch grid, which is
  what the comment in their code describes ("fill small holes in the mask, enlarge slightly").
- An image whose mask comes out empty keeps all its patches (theirs would score it 0, undetectable).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BORDER = 0.2  # share of the grid cut from each side to form the centre crop
CENTRE_KEEP = 0.35  # the positive side is taken as foreground if it keeps more than this share of the crop
KERNEL = 3  # morphology kernel (patches)


def first_component(tokens: torch.Tensor) -> torch.Tensor:
    """(B, N, C) tokens -> (B, N) scores on each image's first principal axis (centred per image).

    Sign: the axis' entry of largest magnitude is positive (sklearn >= 1.5's svd_flip)."""
    x = tokens.float()
    x = x - x.mean(dim=1, keepdim=True)
    cov = x.transpose(1, 2) @ x  # (B, C, C); eigh sorts eigenvalues ascending
    axis = torch.linalg.eigh(cov).eigenvectors[..., -1]  # (B, C)
    lead = axis.gather(1, axis.abs().argmax(dim=1, keepdim=True))
    axis = axis * torch.where(lead < 0, -1.0, 1.0)
    return (x @ axis.unsqueeze(-1)).squeeze(-1)


def centre_crop(grid: tuple[int, int], border: float = BORDER) -> tuple[slice, slice]:
    h, w = grid
    return slice(int(h * border), int(h * (1 - border))), slice(int(w * border), int(w * (1 - border)))


def dilate(mask: torch.Tensor, kernel: int = KERNEL) -> torch.Tensor:
    """(B, h, w) bool -> bool: a patch is set when any patch of its kernel x kernel square is (outside
    the grid counts as unset)."""
    x = mask.float().unsqueeze(1)
    return F.max_pool2d(x, kernel, stride=1, padding=kernel // 2).squeeze(1) > 0.5


def erode(mask: torch.Tensor, kernel: int = KERNEL) -> torch.Tensor:
    """(B, h, w) bool -> bool: a patch stays set when every patch of its square inside the grid is set
    (outside counts as set, as OpenCV's default border does for erosion)."""
    return ~dilate(~mask, kernel)


def foreground_mask(tokens: torch.Tensor, grid: tuple[int, int], threshold: float = 10.0) -> torch.Tensor:
    """(B, N, C) unit-length patch tokens on a grid (h, w), N = h * w -> (B, h, w) bool foreground."""
    B, N, C = tokens.shape
    h, w = grid
    if h * w != N:
        raise ValueError(f"{N} tokens do not fill a {h}x{w} grid")
    score = (first_component(tokens) * math.sqrt(C)).reshape(B, h, w)
    positive = score > threshold
    rows, cols = centre_crop(grid)
    crop = positive[:, rows, cols]
    flip = crop.flatten(1).sum(1) <= crop[0].numel() * CENTRE_KEEP  # (B,)
    mask = torch.where(flip[:, None, None], -score > threshold, positive)
    mask = erode(dilate(dilate(mask)))  # dilate, then close (dilate + erode)
    empty = ~mask.flatten(1).any(1)
    return mask | empty[:, None, None]
