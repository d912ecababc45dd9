"""Frozen feature extractors behind one interface.

A backbone takes images in [0, 1] (B, 3, H, W) and returns, for the configured layers,
L2-normalised patch tokens on one grid plus an L2-normalised global embedding. Everything
downstream (memory banks, FDSL heads, windows) only sees `BackboneOutput`, so swapping the
extractor is a config change. Architectures are small JSON files in `models/configs/`, one
per backbone, whose "kind" picks the class: open_clip (CLIP ViTs), timm_vit (timm ViTs such
as DINOv2) or timm_cnn (timm CNNs resized onto one token grid).

Modules: `base` (interface, configs), `open_clip` (CLIP ViTs and their text tower),
`weights` (where timm weights come from and how files are matched to a model), `timm`
(timm ViTs and CNNs), `factory` (`create_backbone`).
"""
from __future__ import annotations

from models.backbones.base import (CONFIG_DIR, DEFAULT_BACKBONE, PRECISIONS, Backbone, BackboneError,
                                   BackboneOutput, list_backbones, load_backbone_config, resolve_precision)
from models.backbones.factory import create_backbone
from models.backbones.open_clip import CLIPTextEncoder, OpenCLIPBackbone, resolve_quick_gelu
from models.backbones.timm import TimmCNNBackbone, TimmViTBackbone, create_timm_classifier
from models.backbones.weights import (load_weight_file, prepare_state_dict, remap_by_position,
                                      resolve_weights)

__all__ = [
    "CONFIG_DIR", "DEFAULT_BACKBONE", "PRECISIONS", "Backbone", "BackboneError", "BackboneOutput", "CLIPTextEncoder",
    "OpenCLIPBackbone", "TimmCNNBackbone", "TimmViTBackbone", "create_backbone", "create_timm_classifier",
    "list_backbones", "load_backbone_config", "load_weight_file", "prepare_state_dict", "remap_by_position",
    "resolve_precision", "resolve_quick_gelu", "resolve_weights",
]
