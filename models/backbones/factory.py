"""`create_backbone`: a config name, file or dict -> the frozen extractor of its kind."""
from __future__ import annotations

import os

import torch

from models.backbones.base import DEFAULT_BACKBONE, Backbone, BackboneError, load_backbone_config
from models.backbones.open_clip import OpenCLIPBackbone
from models.backbones.timm import TimmCNNBackbone, TimmViTBackbone

_KINDS = {"open_clip": OpenCLIPBackbone, "timm_vit": TimmViTBackbone, "timm_cnn": TimmCNNBackbone}


def create_backbone(spec: str | dict | os.PathLike = DEFAULT_BACKBONE, device: str | torch.device = "cpu",
                    pretrained: str | None = None, image_size: int | None = None) -> Backbone:
    """One entry point for every extractor. `pretrained` (a tag or a local file) and
    `image_size` override the config's values."""
    cfg = load_backbone_config(spec)
    if image_size:
        cfg["image_size"] = int(image_size)
    kind = cfg.get("kind")
    if kind not in _KINDS:
        raise BackboneError(f"backbone config '{cfg.get('name')}': unknown kind '{kind}', "
                            f"expected one of {sorted(_KINDS)}")
    if pretrained is not None:
        # 'none' asks for random weights explicitly (tests, timing the architecture)
        cfg["pretrained"] = None if str(pretrained).lower() in ("", "none", "random") else pretrained
    backbone = _KINDS[kind](cfg, pretrained=cfg.get("pretrained"))
    if backbone.image_size % backbone.patch_size:
        raise BackboneError(f"image_size {backbone.image_size} is not a multiple of the patch size "
                            f"{backbone.patch_size} (backbone '{cfg.get('name')}')")
    return backbone.to(device)
