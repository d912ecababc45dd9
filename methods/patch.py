"""Methods that score each query patch against its nearest reference patch (FDSL, knn, anomalydino).

They share the reference state (whole-image bank, optional LFE window bank), the whole-image
path, the window path (models/lfe.py) and the blend; a subclass says how aligned tokens become
per-layer anomaly maps and how a stitched window map is refined, and may mask patches and choose
the image score (hooks `needs_mask`, `patch_mask`, `score_maps`: methods/knn.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from methods.base import InferenceOptions, Method
from models.backbones import Backbone, BackboneOutput
from models.lfe import WindowBank, WindowScorer, blend
from models.memory import ReferenceBank, align_to_banks
from models.modes import in_eval_mode
from models.scoring import maps_and_scores

ROLE = "backbone"  # the one backbone of a patch-matching method


@dataclass
class PatchState:
    bank: ReferenceBank
    window_bank: Optional[WindowBank] = None


class PatchMatchingMethod(Method):
    def __init__(self, backbone: Backbone, heads: torch.nn.Module | None = None, config: dict | None = None):
        super().__init__({ROLE: backbone}, config)
        self.heads = heads
        self.windows: WindowScorer | None = None

    @classmethod
    def build(cls, config: dict, backbones: dict[str, Backbone]) -> "PatchMatchingMethod":
        return cls(backbones[ROLE], cls.build_heads(config, backbones[ROLE]), config)

    @classmethod
    def build_heads(cls, config: dict, backbone: Backbone) -> torch.nn.Module | None:
        return None

    @property
    def backbone(self) -> Backbone:
        return self.backbones[ROLE]

    # -- what a subclass defines ----------------------------------------------------------------
    def whole_layer_maps(self, feats: BackboneOutput, aligned: list[torch.Tensor]) -> torch.Tensor:
        """(L, B, h, w) anomaly maps of whole images from their tokens and aligned reference tokens."""
        return self.window_layer_maps(feats.patch_tokens, aligned, feats.grid)

    def window_layer_maps(self, tokens: Sequence[torch.Tensor], aligned: Sequence[torch.Tensor],
                          grid: tuple[int, int]) -> torch.Tensor:
        """(L, n, h, w) raw anomaly maps of n windows, before refinement."""
        raise NotImplementedError

    def refine_stitched(self, layer_maps: torch.Tensor) -> torch.Tensor:
        """Refinement applied once to the stitched window maps (L, B, h, w)."""
        return layer_maps

    # -- the method surface -----------------------------------------------------------------------
    def configure(self, options: InferenceOptions) -> None:
        if options.precision is not None:
            self.set_precision(options.precision)
        self.options = options
        self.windows = None if options.winmode == "nan" else WindowScorer(
            self, options.win_size, options.win_stride, use_image_index=options.image_index != "off",
            window_batch=options.window_batch)

    @torch.no_grad()
    def build_bank(self, images: torch.Tensor, sources: Sequence[str] = (), batch_size: int = 8) -> ReferenceBank:
        """Reference bank of one category from its k normal images (k, 3, H, W) in [0, 1]."""
        outs = self.encode(images, ROLE, batch_size)
        bank = ReferenceBank.concat([ReferenceBank(o.patch_tokens, o.global_embedding, o.grid) for o in outs])
        bank.sources = list(sources)
        return bank

    def fit(self, images: torch.Tensor, sources: Sequence[str] = (), batch_size: int = 8, *,
            category: str | None = None) -> PatchState:
        bank = self.build_bank(images, sources, batch_size)
        return PatchState(bank, self.windows.build_bank(images) if self.windows is not None else None)

    # -- hooks of the training-free ingredients (knn, anomalydino); the defaults are FDSL's path -----
    def patch_mask(self, feats: BackboneOutput, state: PatchState) -> Optional[torch.Tensor]:
        """(B, h, w) bool patches to score, from the whole image's features; None = all of them."""
        return None

    def needs_mask(self, state: PatchState) -> bool:
        return False

    def score_maps(self, layer_maps: torch.Tensor, out_size: tuple[int, int],
                   keep: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, B, h, w) layer maps -> (map, score); patches outside `keep` score 0."""
        if keep is not None:
            layer_maps = layer_maps * keep.to(layer_maps.dtype)
        return maps_and_scores(layer_maps, out_size)

    # -- prediction ---------------------------------------------------------------------------------
    def whole_maps(self, feats: BackboneOutput, bank: ReferenceBank, use_image_index: bool = False) -> torch.Tensor:
        aligned = align_to_banks(feats.patch_tokens, [bank] * feats.patch_tokens[0].shape[0],
                                 feats.global_embedding, use_image_index)
        return self.whole_layer_maps(feats, aligned)

    @torch.no_grad()
    @in_eval_mode  # BatchNorm in the heads: running statistics whatever mode the caller left
    def predict_whole(self, images: torch.Tensor, bank: ReferenceBank, out_size: tuple[int, int],
                      use_image_index: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole-image path: anomaly maps (B, *out_size) and scores (B,)."""
        return self.score_maps(self.whole_maps(self.backbone(images), bank, use_image_index), out_size)

    @torch.no_grad()
    @in_eval_mode
    def predict(self, images: torch.Tensor, state: PatchState, out_size: tuple[int, int]):
        o = self.options
        whole = o.winmode != "onlywin"  # the whole-image result would be discarded by blend
        feats = self.backbone(images) if whole or self.needs_mask(state) else None
        keep = self.patch_mask(feats, state) if self.needs_mask(state) else None
        whole_map = whole_score = None
        if whole:
            whole_map, whole_score = self.score_maps(self.whole_maps(feats, state.bank, o.image_index == "all"),
                                                     out_size, keep)
        if self.windows is None:
            return whole_map, whole_score
        win_map, win_score = self.score_maps(self.windows.window_layer_maps(images, state.window_bank), out_size, keep)
        return blend(o.winmode, o.win_weight, whole_map, whole_score, win_map, win_score)

    def state_nbytes(self, state: PatchState) -> dict[str, int]:
        out = {"bank_bytes": state.bank.nbytes()}
        if state.window_bank is not None:
            out["window_bank_bytes"] = state.window_bank.nbytes()
        return out
