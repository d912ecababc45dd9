"""FDSL as a method: the frozen backbone's tokens aligned to the nearest reference patch (FD),
scored by the per-layer ASL heads and refined by the NAM (models/fdsl.py).

Method parameters (methods/configs/fdsl.json): `use_nam`, `hidden` (ASL widths).
"""
from __future__ import annotations

from typing import Sequence

import torch

from methods.patch import PatchMatchingMethod, PatchState
from models.backbones import Backbone, BackboneOutput
from models.fdsl import FDSL
from models.memory import align_to_banks
from models.scoring import final_image_scores, upsample_probs
from utils.losses import segmentation_loss


class FDSLMethod(PatchMatchingMethod):
    name = "fdsl"

    @classmethod
    def build_heads(cls, config: dict, backbone: Backbone) -> FDSL:
        return FDSL(backbone.layer_dims, bool(config.get("use_nam", True)),
                    tuple(config.get("hidden", (512, 128, 32)))).to(backbone.mean.device)

    @classmethod
    def checkpoint_tag(cls, config: dict) -> str:
        return f"nam{int(bool(config.get('use_nam', True)))}"  # the authors' folder naming

    @classmethod
    def validate_config(cls, config: dict) -> None:
        if not isinstance(config.get("use_nam", True), bool):
            raise ValueError(f"fdsl: use_nam must be true or false, got {config.get('use_nam')!r}")
        hidden = config.get("hidden", [])
        if not all(isinstance(h, int) and h > 0 for h in hidden):
            raise ValueError(f"fdsl: hidden must be a list of positive integers, got {hidden!r}")

    def whole_layer_maps(self, feats: BackboneOutput, aligned: list[torch.Tensor]) -> torch.Tensor:
        return self.heads(feats.patch_tokens, aligned, feats.grid).anomaly_maps()

    def window_layer_maps(self, tokens: Sequence[torch.Tensor], aligned: Sequence[torch.Tensor],
                          grid: tuple[int, int]) -> torch.Tensor:
        return self.heads.score_layers(tokens, aligned, grid)[:, :, 1]

    def refine_stitched(self, layer_maps: torch.Tensor) -> torch.Tensor:
        if not self.heads.use_nam:
            return layer_maps
        probs = torch.stack([1.0 - layer_maps, layer_maps], dim=2)  # (L, B, 2, h, w)
        return self.heads.aggregate(probs)[:, :, 1]

    def loss(self, batch: dict, states: Sequence[PatchState]) -> torch.Tensor:
        """Focal + Dice on every layer map and every NAM map, upsampled to the image size."""
        images, masks = batch["image"].to(self.device), batch["mask"].to(self.device)
        feats = self.backbone(images)
        aligned = align_to_banks(feats.patch_tokens, [s.bank for s in states])
        out = self.heads(feats.patch_tokens, aligned, feats.grid)
        return segmentation_loss([upsample_probs(m, self.image_size) for m in out.supervised_maps()], masks)

    def image_scores(self, scores: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        return final_image_scores(scores, maps.flatten(1).amax(1))
