"""knn: the training-free baseline on the same backbone and banks as FDSL, with AnomalyDINO's
ingredients as options (all off by default).

A patch's anomaly score is 1 - cosine to its nearest reference patch (tokens are unit length),
averaged over layers; the image score is the mean over layers of each layer map's maximum.
It shows what the learned heads add over plain patch matching. LFE windows work as for FDSL.

Method parameters (methods/configs/knn.json; anomalydino.json sets AnomalyDINO's values):
  rotations       angles (degrees) at which every reference enters the bank, [] = as given
                  (models/augment.py); the LFE window bank is built from the same rotated images
  top_percent     image score = mean of the highest top_percent % of each layer map's patches,
                  null = the maximum (models/scoring.py)
  masking         "off", "on" (every category) or "categories" (those in mask_categories): test
                  patches outside the zero-shot PCA foreground (models/foreground.py, on the deepest
                  layer's tokens of the whole image) score 0, in the whole-image and window maps alike
  mask_categories category names masked under "categories"
  mask_threshold  the foreground threshold on the first principal component (tokens scaled to sqrt(C))
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from methods.patch import PatchMatchingMethod, PatchState
from models.augment import rotate_images
from models.backbones import BackboneOutput
from models.foreground import foreground_mask
from models.memory import distance_maps
from models.scoring import maps_and_scores

MASKING = ("off", "on", "categories")
DEFAULTS = {"rotations": [], "top_percent": None, "masking": "off", "mask_categories": [], "mask_threshold": 10.0}


@dataclass
class KNNState(PatchState):
    masked: bool = False  # whether this category's test patches are foreground-masked


class KNNMethod(PatchMatchingMethod):
    name = "knn"
    trainable = False
    # one ingredient of AnomalyDINO each, on top of plain knn (launchers: ABLATION=aug, ...)
    ablations = {"aug": {"rotations": [0, 45, 90, 135, 180, 225, 270, 315]}, "top1p": {"top_percent": 1.0},
                 "mask": {"masking": "on"}}

    @classmethod
    def validate_config(cls, config: dict) -> None:
        name = config.get("method", cls.name)
        rotations = config.get("rotations", [])
        if not isinstance(rotations, list) or not all(isinstance(a, numbers.Real) and not isinstance(a, bool)
                                                      for a in rotations):
            raise ValueError(f"{name}: rotations must be a list of angles in degrees, got {rotations!r}")
        top = config.get("top_percent")
        if top is not None and (isinstance(top, bool) or not isinstance(top, numbers.Real) or not 0 < top <= 100):
            raise ValueError(f"{name}: top_percent must be null (the maximum) or a number in (0, 100], got {top!r}")
        if config.get("masking", "off") not in MASKING:
            raise ValueError(f"{name}: masking must be one of {', '.join(MASKING)}, got {config.get('masking')!r}")
        cats = config.get("mask_categories", [])
        if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
            raise ValueError(f"{name}: mask_categories must be a list of category names, got {cats!r}")
        t = config.get("mask_threshold", 10.0)
        if isinstance(t, bool) or not isinstance(t, numbers.Real):
            raise ValueError(f"{name}: mask_threshold must be a number, got {t!r}")

    def param(self, key: str):
        return self.config.get(key, DEFAULTS[key])

    @classmethod
    def masks_category(cls, config: dict, category: str | None) -> bool:
        """Whether test patches of `category` are foreground-masked under `config`."""
        mode = config.get("masking", "off")
        return mode == "on" or (mode == "categories" and category in config.get("mask_categories", []))

    # -- reference state ------------------------------------------------------------------------
    def fit(self, images: torch.Tensor, sources: Sequence[str] = (), batch_size: int = 8, *,
            category: str | None = None) -> KNNState:
        refs = rotate_images(images, self.param("rotations"))
        bank = self.build_bank(refs, sources, batch_size)
        windows = self.windows.build_bank(refs) if self.windows is not None else None
        return KNNState(bank, windows, self.masks_category(self.config, category))

    def state_info(self, state: KNNState) -> dict:
        return {**self.state_nbytes(state), "foreground_masked": bool(state.masked)}

    # -- scoring ----------------------------------------------------------------------------------
    def window_layer_maps(self, tokens: Sequence[torch.Tensor], aligned: Sequence[torch.Tensor],
                          grid: tuple[int, int]) -> torch.Tensor:
        return distance_maps(tokens, aligned, grid)

    def needs_mask(self, state: PatchState) -> bool:
        return bool(getattr(state, "masked", False))

    def patch_mask(self, feats: BackboneOutput, state: PatchState) -> Optional[torch.Tensor]:
        # the deepest configured layer: AnomalyDINO's one layer is DINOv2's last
        return foreground_mask(feats.patch_tokens[-1], feats.grid, float(self.param("mask_threshold")))

    def score_maps(self, layer_maps: torch.Tensor, out_size: tuple[int, int],
                   keep: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        if keep is not None:
            layer_maps = layer_maps * keep.to(layer_maps.dtype)
        top = self.param("top_percent")
        return maps_and_scores(layer_maps, out_size, None if top is None else float(top))
