"""Methods that score each query patch against its nearest reference patch (FDSL, knn).

They share the reference state (whole-image bank, optional LFE window bank), the whole-image
path, the window path (models/lfe.py) and the blend; a subclass only says how aligned tokens
become per-layer anomaly maps and how a stitched window map is refined.
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

    def fit(self, images: torch.Tensor, sources: Sequence[str] = (), batch_size: int = 8) -> PatchState:
        bank = self.build_bank(images, sources, batch_size)
        return PatchState(bank, self.windows.build_bank(images) if self.windows is not None else None)

    @torch.no_grad()
    @in_eval_mode  # BatchNorm in the heads: running statistics whatever mode the caller left
    def predict_whole(self, images: torch.Tensor, bank: ReferenceBank, out_size: tuple[int, int],
                      use_image_index: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole-image path: anomaly maps (B, *out_size) and scores (B,)."""
        feats = self.backbone(images)
        aligned = align_to_banks(feats.patch_tokens, [bank] * images.shape[0], feats.global_embedding,
                                 use_image_index)
        return maps_and_scores(self.whole_layer_maps(feats, aligned), out_size)

    @torch.no_grad()
    @in_eval_mode
    def predict(self, images: torch.Tensor, state: PatchState, out_size: tuple[int, int]):
        o = self.options
        whole_map = whole_score = None
        if o.winmode != "onlywin":  # the whole-image result would be discarded by blend
            whole_map, whole_score = self.predict_whole(images, state.bank, out_size, o.image_index == "all")
        if self.windows is None:
            return whole_map, whole_score
        win_map, win_score = self.windows.predict(images, out_size, state.window_bank)
        return blend(o.winmode, o.win_weight, whole_map, whole_score, win_map, win_score)

    def state_nbytes(self, state: PatchState) -> dict[str, int]:
        out = {"bank_bytes": state.bank.nbytes()}
        if state.window_bank is not None:
            out["window_bank_bytes"] = state.window_bank.nbytes()
        return out
