"""Map and score arithmetic shared by the methods: per-layer patch maps -> evaluation-size maps
and image scores, and the probability upsampling the segmentation losses see."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def maps_and_scores(layer_maps: torch.Tensor, out_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, B, h, w) per-layer anomaly maps on the patch grid -> (map (B, H, W), score (B,)).

    Map: mean over layers, upsampled bilinearly. Score: mean over layers of each layer map's
    maximum on the patch grid (before upsampling, as the FDSL authors did).
    """
    score = layer_maps.amax(dim=(-2, -1)).mean(0)
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
