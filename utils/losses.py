"""Segmentation losses on probability maps (the heads already apply softmax)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, eps: float = 1e-6,
               alpha: float | None = None) -> torch.Tensor:
    """Mean over pixels of -w_t * (1 - p_t)^gamma * log(p_t).

    probs (B, 2, H, W) with channel 1 = anomaly; target (B, H, W) in {0, 1}. p_t is the
    probability of the true class; `eps` keeps log finite where a probability reaches 0.
    w_t = 1 without `alpha`; with it (alpha-balanced focal loss) w_t = alpha on anomalous
    pixels and 1 - alpha on normal ones, to counter the scarcity of defect pixels.
    """
    if probs.ndim != 4 or probs.shape[1] != 2:
        raise ValueError(f"probs must be (B, 2, H, W), got {tuple(probs.shape)}")
    t = target.to(probs.dtype)
    p_t = probs[:, 1] * t + probs[:, 0] * (1 - t)
    p_t = p_t.clamp(min=eps, max=1.0)
    loss = -(1 - p_t) ** gamma * torch.log(p_t)
    if alpha is not None:
        # applied only when given so the unweighted loss stays bit-identical to before
        loss = loss * (alpha * t + (1 - alpha) * (1 - t))
    return loss.mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - mean over the batch of (2 * sum(p * y) + s) / (sum(p) + sum(y) + s), per sample.

    prob (B, H, W) anomaly probability; target (B, H, W) in {0, 1}. The smoothing term makes a
    sample without defects and without predictions score 1 (no loss).
    """
    p = prob.flatten(1)
    y = target.to(prob.dtype).flatten(1)
    dice = (2 * (p * y).sum(1) + smooth) / (p.sum(1) + y.sum(1) + smooth)
    return 1 - dice.mean()


def segmentation_loss(maps: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Focal + Dice on the anomaly channel, summed over every supervised map (B, 2, H, W)."""
    return sum(focal_loss(m, target) + dice_loss(m[:, 1], target) for m in maps)


_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
# Largest Sobel magnitude a map with values in [0, 1] can produce: the gradient vector is a
# sum of per-pixel contributions and its norm is convex in the pixels, so the maximum sits at
# a 0/1 pattern; the best one, e.g. right column and bottom-middle at 1, gives (4, 2).
SOBEL_MAX_MAGNITUDE = math.sqrt(4.0 ** 2 + 2.0 ** 2)


def edge_map(prob: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of (B, H, W) maps in [0, 1], divided by SOBEL_MAX_MAGNITUDE
    (2 * sqrt(5)) so the result lies in [0, 1]. Replicate padding: a map's border is not an edge."""
    if prob.ndim != 3:
        raise ValueError(f"expected (B, H, W) maps, got {tuple(prob.shape)}")
    kx = _SOBEL_X.to(device=prob.device, dtype=prob.dtype)
    kernels = torch.stack([kx, kx.T]).unsqueeze(1)  # (2, 1, 3, 3): d/dx, d/dy
    x = F.pad(prob.unsqueeze(1), (1, 1, 1, 1), mode="replicate")
    sq = F.conv2d(x, kernels).pow(2).sum(1)
    # sqrt has an infinite slope at 0: flat pixels get exactly 0 and a zero gradient instead
    flat = sq <= 0
    return torch.where(flat, torch.zeros_like(sq), torch.sqrt(torch.where(flat, torch.ones_like(sq), sq))) \
        / SOBEL_MAX_MAGNITUDE


def edge_dice_loss(prob: torch.Tensor, target: torch.Tensor, zeta: float = 1.0,
                   squared: bool = True) -> torch.Tensor:
    """Dice loss between the edge maps of a prediction and of a mask, per sample, batch mean.

    1 - (2 * sum(e_p * e_y) + zeta) / (D + zeta), e = edge_map, with D = sum(e_p^2) + sum(e_y^2)
    by default, or sum(e_p) + sum(e_y) with `squared=False`. The Sobel edges of a binary mask are
    fractional (a straight step reaches 4 / (2 sqrt 5), corners less), so only the squared
    denominator is minimised exactly at e_p = e_y; the linear one rewards edges stronger than
    the mask's. zeta makes a sample without edges on either side cost 0.
    """
    e_p = edge_map(prob).flatten(1)
    e_y = edge_map(target.to(prob.dtype)).flatten(1)
    denom = (e_p.pow(2).sum(1) + e_y.pow(2).sum(1)) if squared else (e_p.sum(1) + e_y.sum(1))
    dice = (2 * (e_p * e_y).sum(1) + zeta) / (denom + zeta)
    return 1 - dice.mean()
