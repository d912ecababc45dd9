"""Map and score arithmetic shared by the methods: per-layer patch maps -> evaluation-size maps
and image scores, and the probability upsampling the segmentation losses see."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def top_percent_mean(values: torch.Tensor, percent: float) -> torch.Tensor:
    """Mean of the highest `percent` % of `values` (..., N) along the last axis -> (...).

    The count is floor(N * percent / 100); when that is 0 (few patches) the maximum is used, as
    AnomalyDINO's `mean_top1p` does (src/post_eval.py). percent = 1 is their image score, "an
    empirical tail value at risk at the 99 % quantile".
    """
    if not 0 < percent <= 100:
        raise ValueError(f"top percent must be in (0, 100], got {percent}")
    n = int(values.shape[-1] * percent / 100)
    if n == 0:
        return values.amax(dim=-1)
    return values.topk(n, dim=-1, sorted=False).values.mean(dim=-1)


def layer_scores(layer_maps: torch.Tensor, top_percent: float | None = None) -> torch.Tensor:
    """(L, B, h, w) per-layer maps -> (B,) image scores: mean over layers of each layer map's
    maximum (top_percent None) or of the mean of its highest `top_percent` % patches."""
    flat = layer_maps.flatten(-2)
    per_layer = flat.amax(dim=-1) if top_percent is None else top_percent_mean(flat, top_percent)
    return per_layer.mean(0)


def maps_and_scores(layer_maps: torch.Tensor, out_size: tuple[int, int],
                    top_percent: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, B, h, w) per-layer anomaly maps on the patch grid -> (map (B, H, W), score (B,)).

    Map: mean over layers, upsampled bilinearly. Score: mean over layers of each layer map's
    maximum on the patch grid (before upsampling, as the FDSL authors did), or with
    `top_percent` of the mean of its highest patches (layer_scores).
    """
    score = layer_scores(layer_maps, top_percent)
    mean_map = layer_maps.mean(0, keepdim=True).transpose(0, 1)  # (B, 1, h, w)
    up = F.interpolate(mean_map, size=tuple(out_size), mode="bilinear", align_corners=True)[:, 0]
    return up, score


def upsample_probs(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) probability maps -> (B, C, H, W), as the losses see them."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=True)


def final_image_scores(head_scores: torch.Tensor, map_max: torch.Tensor) -> torch.Tensor:
    """FDSL: 0.5 * (head score + map maximum min-max normalised over the category's test images)."""
    lo, hi = map_max.min(), map_max.max()
    norm = (map_max - lo) / (hi - lo) if hi > lo else torch.zeros_like(map_max)
    return 0.5 * (head_scores + norm)
