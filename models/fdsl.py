"""FDSL's trainable heads: Feature Discrepancy -> Anomaly Score Learning -> Neighbour Aggregation.

Inputs are backbone tokens and their aligned reference tokens (see models/memory.py); outputs
are per-layer 2-channel (normal, anomaly) probability maps on the patch grid. The module knows
nothing about images, datasets or training loops.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn


def feature_discrepancy(query: torch.Tensor, aligned: torch.Tensor) -> torch.Tensor:
    """FD module: the deviation of a patch from its nearest normal reference, |q - r|."""
    return (query - aligned).abs()


class ASLHead(nn.Module):
    """Patch-wise classifier on the residual of one layer.

    BN(C) -> [Linear (no bias) -> BN -> ReLU] x len(hidden) -> Linear -> 2 logits.
    The leading BN standardises residuals whose scale differs from layer to layer; the hidden
    linears carry no bias because the BN after each of them has its own shift.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int] = (512, 128, 32)):
        super().__init__()
        layers: list[nn.Module] = [nn.BatchNorm1d(in_dim)]
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
            d = h
        layers.append(nn.Linear(d, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        B, N, C = residual.shape
        return self.net(residual.reshape(B * N, C)).reshape(B, N, 2)


class NAM(nn.Module):
    """Neighbour Aggregation Module: two 5x5 convolutions over the 2-channel probability map,
    so a patch's score takes its neighbours into account. Shared by all layers."""

    def __init__(self, hidden: int = 6, kernel: int = 5):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(2, hidden, kernel, padding="same"), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 2, kernel, padding="same"))

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        """probs (B, 2, h, w) -> probabilities (B, 2, h, w)."""
        return self.net(probs).softmax(dim=1)


@dataclass
class FDSLOutput:
    layer_probs: torch.Tensor  # (L, B, 2, h, w) ASL probabilities per layer
    nam_probs: torch.Tensor | None  # (L, B, 2, h, w) after NAM, or None without NAM

    def anomaly_maps(self) -> torch.Tensor:
        """(L, B, h, w) anomaly probability used at test time: the NAM output when present."""
        probs = self.nam_probs if self.nam_probs is not None else self.layer_probs
        return probs[:, :, 1]

    def supervised_maps(self) -> list[torch.Tensor]:
        """Every map the loss sees: each layer's ASL map, and its NAM map when present."""
        maps = list(self.layer_probs)
        if self.nam_probs is not None:
            maps += list(self.nam_probs)
        return maps


def grid_maps(probs: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, 2) row-major patch probabilities -> (B, 2, rows, cols)."""
    B, N, _ = probs.shape
    if N != grid[0] * grid[1]:
        raise ValueError(f"{N} patches do not fill a {grid[0]}x{grid[1]} grid")
    return probs.transpose(1, 2).reshape(B, 2, grid[0], grid[1])


class FDSL(nn.Module):
    def __init__(self, layer_dims: Sequence[int], use_nam: bool = True,
                 hidden: Sequence[int] = (512, 128, 32)):
        super().__init__()
        self.layer_dims = list(layer_dims)
        self.heads = nn.ModuleList(ASLHead(c, hidden) for c in layer_dims)
        self.nam = NAM() if use_nam else None

    @property
    def use_nam(self) -> bool:
        return self.nam is not None

    def score_layers(self, query_tokens: Sequence[torch.Tensor], aligned_tokens: Sequence[torch.Tensor],
                     grid: tuple[int, int]) -> torch.Tensor:
        """FD + ASL for every layer: (L, B, 2, rows, cols) probabilities, before NAM."""
        if len(query_tokens) != len(self.heads) or len(aligned_tokens) != len(self.heads):
            raise ValueError(f"expected {len(self.heads)} layers, got {len(query_tokens)} query and "
                             f"{len(aligned_tokens)} aligned")
        return torch.stack([
            grid_maps(head(feature_discrepancy(q, a)).softmax(dim=-1), grid)
            for head, q, a in zip(self.heads, query_tokens, aligned_tokens)])

    def aggregate(self, layer_probs: torch.Tensor) -> torch.Tensor:
        """NAM on every layer map at once: (L, B, 2, h, w) -> (L, B, 2, h, w)."""
        L, B = layer_probs.shape[:2]
        return self.nam(layer_probs.flatten(0, 1)).unflatten(0, (L, B))

    def forward(self, query_tokens, aligned_tokens, grid) -> FDSLOutput:
        layer_probs = self.score_layers(query_tokens, aligned_tokens, grid)
        return FDSLOutput(layer_probs, self.aggregate(layer_probs) if self.use_nam else None)
