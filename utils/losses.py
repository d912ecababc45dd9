"""Segmentation losses on probability maps (the heads already apply softmax)."""
from __future__ import annotations

import torch


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """Mean over pixels of -(1 - p_t)^gamma * log(p_t).

    probs (B, 2, H, W) with channel 1 = anomaly; target (B, H, W) in {0, 1}. p_t is the
    probability of the true class; `eps` keeps log finite where a probability reaches 0.
    """
    if probs.ndim != 4 or probs.shape[1] != 2:
        raise ValueError(f"probs must be (B, 2, H, W), got {tuple(probs.shape)}")
    t = target.to(probs.dtype)
    p_t = probs[:, 1] * t + probs[:, 0] * (1 - t)
    p_t = p_t.clamp(min=eps, max=1.0)
    return (-(1 - p_t) ** gamma * torch.log(p_t)).mean()


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
