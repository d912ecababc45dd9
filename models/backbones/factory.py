"""`create_backbone`: a config name, file or dict -> the frozen extractor of its kind."""
from __future__ import annotations

import os

import torch

from models.backbones.base import DEFAULT_BACKBONE, Backbone, BackboneError, load_backbone_config
from models.backbones.open_clip import OpenCLIPBackbone
from models.backbones.timm import TimmCNNBackbone, TimmViTBackbone

_KINDS = {"open_clip": OpenCLIPBackbone, "timm_vit": TimmViTBackbone, "timm_cnn": TimmCNNBackbone}


_OPEN_CLIP_ONLY = ("keep_text", "project_tokens")  # need a CLIP text tower / joint space


def create_backbone(spec: str | dict | os.PathLike = DEFAULT_BACKBONE, device: str | torch.device = "cpu",
                    pretrained: str | None = None, image_size: int | None = None,
                    keep_text: bool | None = None, project_tokens: bool | None = None) -> Backbone:
    """One entry point for every extractor. `pretrained` (a tag or a local file), `image_size`,
    `keep_text` and `project_tokens` override the config's values when not None."""
    cfg = load_backbone_config(spec)
    if image_size:
        cfg["image_size"] = int(image_size)
    for key, value in (("keep_text", keep_text), ("project_tokens", project_tokens)):
        if value is not None:
            cfg[key] = bool(value)
    kind = cfg.get("kind")
    if kind not in _KINDS:
        raise BackboneError(f"backbone config '{cfg.get('name')}': unknown kind '{kind}', "
                            f"expected one of {sorted(_KINDS)}")
    wanted = [k for k in _OPEN_CLIP_ONLY if cfg.get(k)]
    if wanted and kind != "open_clip":
        raise BackboneError(f"backbone config '{cfg.get('name')}': {', '.join(wanted)} need kind 'open_clip' "
                            f"(a CLIP with a text tower), not '{kind}'")
    if pretrained is not None:
        # 'none' asks for random weights explicitly (tests, timing the architecture)
        cfg["pretrained"] = None if str(pretrained).lower() in ("", "none", "random") else pretrained
    backbone = _KINDS[kind](cfg, pretrained=cfg.get("pretrained"))
    if backbone.image_size % backbone.patch_size:
        raise BackboneError(f"image_size {backbone.image_size} is not a multiple of the patch size "
                            f"{backbone.patch_size} (backbone '{cfg.get('name')}')")
    return backbone.to(device)
