"""A PCA subspace of normal patch features and the residual outside it (SubspaceAD).

Fit: the mean mu and covariance of all reference patch features, its eigenvectors sorted by
eigenvalue, and the r leading ones as an orthonormal basis U (D, r). Score of a feature x: the
squared norm of its residual outside the affine subspace, ||x - mu - U U^T (x - mu)||^2.

The statistics are accumulated batch by batch (Chan et al.'s pairwise update of mean and
centred scatter, in float64), so the references and their augmentations never have to be held
in memory at once, and no `sum x x^T - n mu mu^T` cancellation loses precision when the mean is
large against the spread (raw ViT features).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class MomentAccumulator:
    """Running count, mean and centred scatter matrix sum (x - mean)(x - mean)^T of D-dim rows."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.dim = int(dim)
        self.n = 0
        self.mean = torch.zeros(self.dim, dtype=torch.float64, device=device)
        self.scatter = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        """Add rows x (M, D)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (M, {self.dim}), got {tuple(x.shape)}")
        m = int(x.shape[0])
        if m == 0:
            return
        x = x.to(self.mean.device, torch.float64)
        batch_mean = x.mean(0)
        centred = x - batch_mean
        batch_scatter = centred.T @ centred
        n = self.n
        delta = batch_mean - self.mean
        total = n + m
        self.mean += delta * (m / total)
        self.scatter += batch_scatter + torch.outer(delta, delta) * (n * m / total)
        self.n = total

    def covariance(self) -> torch.Tensor:
        """Unbiased sample covariance (D, D), float64 (divided by n - 1, as the authors' code)."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.n}")
        return self.scatter / (self.n - 1)


def rank_for_variance(eigenvalues: torch.Tensor, explained_variance: float) -> int:
    """Smallest r whose r largest eigenvalues (sorted descending) explain at least the fraction
    `explained_variance` of their sum (the authors: searchsorted on the cumulative ratio, + 1)."""
    total = eigenvalues.sum()
    if not torch.isfinite(total) or float(total) <= 0:
        return 0  # no variance at all: every reference feature is the mean
    cumulative = torch.cumsum(eigenvalues, 0) / total
    target = torch.tensor([float(explained_variance)], dtype=cumulative.dtype, device=cumulative.device)
    # the ratio reaches 1.0 only up to rounding: clamp to the number of eigenvalues
    return min(int(torch.searchsorted(cumulative, target)) + 1, int(eigenvalues.numel()))


def numerical_rank(eigenvalues: torch.Tensor, n_samples: int) -> int:
    """How many directions the references really span: n samples span at most n - 1 (the affine
    hull through their mean), and eigenvalues at rounding level (relative to the largest) are no
    direction at all: their eigenvectors are arbitrary vectors of the null space."""
    if eigenvalues.numel() == 0 or float(eigenvalues[0]) <= 0:
        return 0
    tol = float(eigenvalues[0]) * eigenvalues.numel() * torch.finfo(eigenvalues.dtype).eps
    return min(int((eigenvalues > tol).sum()), max(n_samples - 1, 0))


@dataclass
class Subspace:
    mean: torch.Tensor  # (D,)
    basis: torch.Tensor  # (D, r), orthonormal columns, leading principal directions first
    eigenvalues: torch.Tensor  # (r,) variances along the basis
    total_variance: float  # trace of the covariance
    n_samples: int  # feature vectors it was fitted on
    requested_rank: int  # what the setting asked for, before the cap to the numerical rank

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    @property
    def explained(self) -> float:
        """Fraction of the references' variance inside the subspace."""
        return float(self.eigenvalues.sum()) / self.total_variance if self.total_variance > 0 else 1.0

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """Squared residual norm ||x - mu - U U^T (x - mu)||^2 of every feature x (..., D) -> (...).

        Two matmuls over all features at once; the residual vector is formed explicitly rather than
        as ||x - mu||^2 - ||U^T (x - mu)||^2, whose difference of two large numbers loses the small
        residuals of normal patches in float32."""
        centred = x.to(self.mean.dtype) - self.mean
        coords = centred @ self.basis  # (..., r)
        resid = centred - coords @ self.basis.T
        return (resid * resid).sum(-1)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.mean, self.basis, self.eigenvalues))

    def to(self, device) -> "Subspace":
        return Subspace(self.mean.to(device), self.basis.to(device), self.eigenvalues.to(device),
                        self.total_variance, self.n_samples, self.requested_rank)


def fit_subspace(acc: MomentAccumulator, explained_variance: float | None = 0.99,
                 rank: int | None = None, dtype: torch.dtype = torch.float32) -> Subspace:
    """The PCA subspace of the accumulated features: a fixed `rank`, else the smallest rank that
    explains `explained_variance` of the variance. Either is capped at the numerical rank (see
    `numerical_rank`: with fewer reference patches than feature dimensions, e.g. 1 shot at a small
    resolution, a larger rank would add arbitrary null-space directions, not normal variation).
    Eigendecomposition of the float64 covariance (eigh); the model is stored in `dtype`."""
    if rank is None and explained_variance is None:
        raise ValueError("fit_subspace needs explained_variance or rank")
    evals, evecs = torch.linalg.eigh(acc.covariance())  # ascending
    evals = evals.flip(0).clamp_min(0)  # rounding can leave tiny negative eigenvalues
    evecs = evecs.flip(1)
    requested = int(rank) if rank is not None else rank_for_variance(evals, explained_variance)
    r = min(requested, numerical_rank(evals, acc.n))
    return Subspace(acc.mean.to(dtype), evecs[:, :r].to(dtype).contiguous(), evals[:r].to(dtype),
                    float(evals.sum()), acc.n, requested)
