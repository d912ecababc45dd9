"""subspacead: SubspaceAD (Lendering, Akdag, Bondarev, CVPR 2026), training-free.

Per category, a PCA subspace of the patch features of the k references and of randomly rotated
copies of them (models/subspace.py); a test patch's anomaly score is its squared residual outside
that subspace. The map is upsampled to the input resolution and lightly blurred; the image score
is the mean of its highest 1 % of pixels. What follows the authors and where it differs, with the
source of each fact: docs/subspacead.md.

Features: the backbone's layers fused into one vector per patch (the authors: the mean of the raw,
not normalised, hidden states of DINOv2-G blocks 23-29); backbones whose layers differ in width
(CNNs) are concatenated instead (`layer_fusion` "auto"). No LFE windows: see docs/subspacead.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Sequence

import torch
import torch.nn.functional as F

from methods.base import Method
from models.backbones import Backbone
from models.augment import rotate_each
from models.scoring import top_percent_mean
from models.subspace import MomentAccumulator, Subspace, fit_subspace

ROLE = "backbone"
LAYER_FUSIONS = ("auto", "mean", "concat")
FEATURE_NORMS = ("none", "l2")


# ---------------------------------------------------------------------------------------------
# map post-processing and the image score (the rotation is models/augment.py's, the top-% mean
# models/scoring.py's)
# ---------------------------------------------------------------------------------------------

def gaussian_blur(maps: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    """(B, H, W) maps blurred by a separable kernel x kernel Gaussian, edges mirrored without
    repeating the edge pixel (OpenCV's GaussianBlur default border, which the authors called)."""
    if kernel <= 1 or sigma <= 0:
        return maps
    x = torch.arange(kernel, dtype=torch.float32, device=maps.device) - (kernel - 1) / 2
    g = torch.exp(-x * x / (2 * sigma * sigma))
    g = g / g.sum()
    pad = kernel // 2
    out = F.pad(maps[:, None], (pad, pad, pad, pad), mode="reflect")
    out = F.conv2d(out, g.view(1, 1, 1, -1))
    out = F.conv2d(out, g.view(1, 1, -1, 1))
    return out[:, 0]


def top_fraction_mean(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """(B, H, W) -> (B,): the mean of each map's max(1, floor(fraction * H * W)) highest values
    (fraction 0: the maximum); AnomalyDINO's top-% score on the upsampled map."""
    flat = maps.reshape(maps.shape[0], -1)
    return flat.amax(1) if fraction <= 0 else top_percent_mean(flat, 100 * float(fraction))


# ---------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------

@dataclass
class SubspaceState:
    subspace: Subspace
    grid: tuple[int, int]
    n_references: int  # images the subspace was fitted on, augmentations included
    sources: list[str] = field(default_factory=list)


def _category_folders(sources: Sequence[str]) -> set[str]:
    return {part for s in sources for part in PurePath(str(s)).parent.parts}


class SubspaceADMethod(Method):
    name = "subspacead"
    trainable = False
    # launchers: ABLATION=<name> (one row each in the comparison)
    ablations = {"no_aug": {"augment_count": 0}, "max_score": {"score_top_fraction": 0.0},
                 "l2_features": {"feature_norm": "l2"}}

    def __init__(self, backbone: Backbone, config: dict | None = None):
        super().__init__({ROLE: backbone}, config)
        c = self.config
        self.explained_variance = c.get("explained_variance", 0.99)
        self.rank = c.get("rank")
        self.layer_fusion = c.get("layer_fusion", "auto")
        self.feature_norm = c.get("feature_norm", "none")
        self.augment_count = int(c.get("augment_count", 30))
        self.augment_max_degrees = float(c.get("augment_max_degrees", 345))
        self.augment_seed = int(c.get("augment_seed", 0))
        self.no_augment_categories = set(c.get("no_augment_categories", []))
        self.score_top_fraction = float(c.get("score_top_fraction", 0.01))
        self.blur_kernel = int(c.get("blur_kernel", 3))
        self.blur_sigma = float(c.get("blur_sigma", 4.0))
        dims = set(backbone.layer_dims)
        if self.layer_fusion == "mean" and len(dims) > 1:
            raise ValueError(f"method subspacead: layer_fusion 'mean' needs layers of one width, backbone "
                             f"'{backbone.config.get('name')}' has {backbone.layer_dims}; use 'concat' or 'auto'")
        self.fuse_mean = self.layer_fusion == "mean" or (self.layer_fusion == "auto" and len(dims) == 1)
        self.feature_dim = backbone.layer_dims[0] if self.fuse_mean else sum(backbone.layer_dims)

    @classmethod
    def build(cls, config: dict, backbones: dict[str, Backbone]) -> "SubspaceADMethod":
        return cls(backbones[ROLE], config)

    @classmethod
    def validate_config(cls, config: dict) -> None:
        def bad(key, expected):
            raise ValueError(f"method subspacead: parameter '{key}' must be {expected}, got {config.get(key)!r}")

        def number(key, lo, hi, integer=False, optional=False):
            if key not in config or (config[key] is None and optional):
                return
            v = config[key]
            ok = isinstance(v, int) if integer else isinstance(v, (int, float))
            if isinstance(v, bool) or not ok or not lo <= v <= hi:
                kind = "an integer" if integer else "a number"
                bad(key, f"{kind} in [{lo}, {hi}]" + (" or null" if optional else ""))

        ev = config.get("explained_variance", 0.99)
        if ev is not None and (isinstance(ev, bool) or not isinstance(ev, (int, float)) or not 0 < ev <= 1):
            bad("explained_variance", "a fraction in (0, 1], or null to use 'rank'")
        number("rank", 1, 10 ** 9, integer=True, optional=True)
        if ev is None and config.get("rank") is None:
            raise ValueError("method subspacead: set 'explained_variance' or 'rank'")
        if config.get("layer_fusion", "auto") not in LAYER_FUSIONS:
            bad("layer_fusion", f"one of {', '.join(LAYER_FUSIONS)}")
        if config.get("feature_norm", "none") not in FEATURE_NORMS:
            bad("feature_norm", f"one of {', '.join(FEATURE_NORMS)}")
        for key in ("augment_count", "augment_seed", "blur_kernel"):
            number(key, 0, 10 ** 9, integer=True)
        number("augment_max_degrees", 0, 360)
        number("score_top_fraction", 0, 1)
        number("blur_sigma", 0, 10 ** 6)
        if config.get("blur_kernel", 3) > 1 and config.get("blur_kernel", 3) % 2 == 0:
            bad("blur_kernel", "odd (or 0 / 1: no blur)")
        cats = config.get("no_augment_categories", [])
        if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
            bad("no_augment_categories", "a list of category names")

    @property
    def backbone(self) -> Backbone:
        return self.backbones[ROLE]

    # -- features ----------------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, N, D) fused patch features of images (B, 3, H, W) in [0, 1], and the grid."""
        out = self.backbone(images.to(self.device), normalize_tokens=False)
        layers = out.patch_tokens
        if self.feature_norm == "l2":
            layers = [F.normalize(t, dim=-1) for t in layers]
        fused = torch.stack(layers).mean(0) if self.fuse_mean else torch.cat(layers, dim=-1)
        return fused, out.grid

    # -- references ----------------------------------------------------------------------------------
    def augmentations(self, sources: Sequence[str] = (), category: str | None = None) -> int:
        """Rotated copies per reference: none for a category the authors left unrotated (their
        transistor, whose 'misplaced' defect is a rotation): the category given, else found among
        the sources' folders."""
        names = {category} if category else _category_folders(sources)
        return 0 if self.no_augment_categories & names else self.augment_count

    def reference_batches(self, images: torch.Tensor, count: int, batch_size: int):
        """The references, then `count` rotated copies of each, in batches: the angles are drawn
        from a generator seeded by `augment_seed`, so the copies depend on nothing but the
        references (not on the category order, the process or the shard that fits them)."""
        k = images.shape[0]
        gen = torch.Generator().manual_seed(self.augment_seed)
        angles = torch.rand(k, count, generator=gen) * self.augment_max_degrees  # uniform [0, max)
        for s in range(0, k, batch_size):
            yield images[s:s + batch_size]
        pairs = [(i, j) for i in range(k) for j in range(count)]
        for s in range(0, len(pairs), batch_size):
            idx = torch.tensor([i for i, _ in pairs[s:s + batch_size]])
            ang = torch.stack([angles[i, j] for i, j in pairs[s:s + batch_size]])
            yield rotate_each(images[idx].to(self.device), ang)

    @torch.no_grad()
    def fit(self, images: torch.Tensor, sources: Sequence[str] = (), batch_size: int = 8, *,
            category: str | None = None) -> SubspaceState:
        """One subspace for the category from its k reference images (k, 3, H, W) in [0, 1]."""
        count = self.augmentations(sources, category)
        acc = MomentAccumulator(self.feature_dim, self.device)
        grid = None
        for batch in self.reference_batches(images, count, batch_size):
            feats, grid = self.features(batch)
            acc.add(feats.reshape(-1, feats.shape[-1]))
        subspace = fit_subspace(acc, self.explained_variance, self.rank)
        return SubspaceState(subspace, grid, images.shape[0] * (1 + count), list(sources))

    # -- test images ------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor, state: SubspaceState, out_size: tuple[int, int]):
        """Anomaly maps (B, *out_size) and image scores (B,): the squared residual of every patch,
        upsampled bilinearly to the input size and blurred; the score is the mean of the top
        `score_top_fraction` of that map, the returned map it resized to out_size."""
        feats, grid = self.features(images)
        patch = state.subspace.residual(feats).reshape(-1, 1, *grid)  # (B, 1, h, w)
        full = F.interpolate(patch, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
        full = gaussian_blur(full, self.blur_kernel, self.blur_sigma)
        scores = top_fraction_mean(full, self.score_top_fraction)
        out_size = tuple(int(s) for s in out_size)
        if tuple(full.shape[-2:]) != out_size:
            full = F.interpolate(full[:, None], size=out_size, mode="bilinear", align_corners=False,
                                 antialias=out_size[0] < full.shape[-2] or out_size[1] < full.shape[-1])[:, 0]
        return full, scores

    def state_nbytes(self, state: SubspaceState) -> dict[str, int]:
        s = state.subspace
        return {"subspace_bytes": s.nbytes(), "subspace_rank": s.rank, "subspace_requested_rank": s.requested_rank,
                "subspace_explained": s.explained, "subspace_samples": s.n_samples,
                "reference_images_fitted": state.n_references}
