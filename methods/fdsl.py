"""FDSL as a method: the frozen backbone's tokens aligned to the nearest reference patch (FD),
scored by the per-layer ASL heads and refined by the NAM (models/fdsl.py).

Method parameters (methods/configs/fdsl.json): `use_nam`, `hidden` (ASL widths), and two test-time
options of our own (not in the paper or the authors' code; the defaults are the authors' behaviour),
which may be set on a trained checkpoint (test.py --param, predict.py --param):

  bn_stats  "train" (default): the heads' BatchNorms use the running statistics of the training set.
            "reference": per test category, recomputed on its k references' residuals (each
            reference patch aligned to its nearest reference patch outside its own image, or at k = 1
            outside one native cell of the layer around it: models/memory.py leave_out_alignment,
            FDSLMethod.leave_out_radii): for a test set whose features are distributed otherwise.
  fd_merge  null (default): the learned (ASL/NAM) map alone, as the authors' released code.
            W in [0, 1]: the paper's merge of the FD and ASL outputs, per layer
            (1 - W) * learned + W * raw distance (1 - cosine to the aligned reference), each map
            min-max normalised on its range over the category's references (leave-one-out), so
            both read 1 = the most anomalous-looking normal reference patch. Whole image only.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from methods.base import InferenceOptions
from methods.patch import PatchMatchingMethod, PatchState
from models.backbones import Backbone, BackboneOutput
from models.fdsl import FDSL, bn_stats_swapped, map_range, merge_maps, reference_bn_stats
from models.memory import align_to_banks, distance_maps, leave_out_alignment
from models.scoring import final_image_scores, upsample_probs
from utils.losses import segmentation_loss

BN_STATS = ("train", "reference")


@dataclass
class FDSLState(PatchState):
    bn_stats: Optional[dict] = None  # BatchNorm buffers for this category (bn_stats "reference")
    learned_scale: Optional[torch.Tensor] = None  # (L, 2) references' range of the learned maps (fd_merge)
    distance_scale: Optional[torch.Tensor] = None  # (L, 2) references' range of the distance maps


class FDSLMethod(PatchMatchingMethod):
    name = "fdsl"
    test_params = ("bn_stats", "fd_merge")

    def __init__(self, backbone: Backbone, heads=None, config: dict | None = None):
        super().__init__(backbone, heads, config)
        self._scales: tuple[torch.Tensor, torch.Tensor] | None = None  # set while predict runs

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
        if config.get("bn_stats", "train") not in BN_STATS:
            raise ValueError(f"fdsl: bn_stats must be one of {', '.join(BN_STATS)}, got {config.get('bn_stats')!r}")
        w = config.get("fd_merge")
        if w is not None and (isinstance(w, bool) or not isinstance(w, numbers.Real) or not 0 <= w <= 1):
            raise ValueError(f"fdsl: fd_merge must be null (the learned map alone) or a weight in [0, 1], got {w!r}")

    @property
    def bn_stats(self) -> str:
        return self.config.get("bn_stats", "train")

    @property
    def fd_merge(self) -> float | None:
        w = self.config.get("fd_merge")
        return None if w is None else float(w)

    def configure(self, options: InferenceOptions) -> None:
        if self.fd_merge is not None and options.winmode != "nan":
            raise ValueError(f"fdsl: fd_merge (the FD/ASL merge) scores whole images only; with winmode "
                             f"'{options.winmode}' leave fd_merge null, or use winmode nan")
        super().configure(options)

    def leave_out_radii(self) -> list[int]:
        """Per layer, the neighbourhood (in grid patches) a reference patch may not match itself in at
        k = 1: one native cell of the layer. A CNN stage coarser than the token grid is resized up to it,
        so its neighbouring tokens are interpolations of one feature: radius stride / patch size
        (efficientnet_lite0 at patch 8: 1, 1, 2, 4); ViT layers are all on the patch grid: 1."""
        reductions = getattr(self.backbone, "reductions", None) or [self.backbone.patch_size] * len(self.heads.heads)
        return [max(1, -(-int(r) // int(self.backbone.patch_size))) for r in reductions]

    # -- reference state ------------------------------------------------------------------------
    def fit(self, images: torch.Tensor, sources: Sequence[str] = (), batch_size: int = 8, *,
            category: str | None = None) -> FDSLState:
        base = super().fit(images, sources, batch_size, category=category)
        state = FDSLState(base.bank, base.window_bank)
        if self.bn_stats == "train" and self.fd_merge is None:
            return state
        tokens = base.bank.tokens
        aligned = [leave_out_alignment(t, base.bank.grid, r) for t, r in zip(tokens, self.leave_out_radii())]
        if self.bn_stats == "reference":
            state.bn_stats = reference_bn_stats(self.heads, tokens, aligned)
        if self.fd_merge is not None:
            with torch.no_grad(), bn_stats_swapped(self.heads, state.bn_stats):
                was = self.heads.training
                self.heads.eval()
                learned = self.heads(tokens, aligned, base.bank.grid).anomaly_maps()
                self.heads.train(was)
            state.learned_scale = map_range(learned)
            state.distance_scale = map_range(distance_maps(tokens, aligned, base.bank.grid))
        return state

    # -- prediction -------------------------------------------------------------------------------
    def predict(self, images: torch.Tensor, state: PatchState, out_size: tuple[int, int]):
        stats = getattr(state, "bn_stats", None)
        if self.bn_stats == "reference" and stats is None:
            raise ValueError("fdsl: bn_stats 'reference' needs the state from this method's fit()")
        if self.fd_merge is not None and getattr(state, "learned_scale", None) is None:
            raise ValueError("fdsl: fd_merge needs the state from this method's fit() (the references' scales)")
        self._scales = (state.learned_scale, state.distance_scale) if self.fd_merge is not None else None
        try:
            with bn_stats_swapped(self.heads, stats):
                return super().predict(images, state, out_size)
        finally:
            self._scales = None

    def whole_layer_maps(self, feats: BackboneOutput, aligned: list[torch.Tensor]) -> torch.Tensor:
        learned = self.heads(feats.patch_tokens, aligned, feats.grid).anomaly_maps()
        if self.fd_merge is None:
            return learned
        if self._scales is None:
            raise ValueError("fdsl: fd_merge maps are computed inside predict() (they need the references' scales)")
        return merge_maps(learned, distance_maps(feats.patch_tokens, aligned, feats.grid), *self._scales,
                          self.fd_merge)

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
