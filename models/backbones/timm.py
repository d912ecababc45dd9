"""timm backbones: ViTs such as DINOv2 (kind timm_vit) and CNNs on one token grid (kind timm_cnn).

`timm` here is the installed library: absolute imports never resolve to this module."""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.backbones.base import Backbone, BackboneError, load_backbone_config
from models.backbones.weights import _LOCAL_HINT, _load_checked, prepare_state_dict, resolve_weights


def _timm_create(name: str, **kwargs) -> nn.Module:
    import timm
    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise BackboneError(f"timm has no model '{name}' (see timm.list_models())") from e
        raise


def _meta_model(name: str, kwargs: dict) -> nn.Module:
    """The full classifier network without memory: key names, shapes, stages, pretrained_cfg."""
    with torch.device("meta"):
        return _timm_create(name, pretrained=False, **kwargs)


def _hub_error(config: dict, tag: str, e: Exception) -> BackboneError:
    return BackboneError(
        f"could not get timm weights '{tag}' for {config['model']} (backbone config '{config.get('name')}'); "
        f"without hub access, download the weights elsewhere and pass the local file with {_LOCAL_HINT}. "
        f"timm said: {type(e).__name__}: {str(e)[:300]}")


def _hub_name(model: str, tag: str) -> str:
    return model if tag.lower() == "timm" else f"{model}.{tag}"


def _timm_build(name: str, source: str, where: str | None, config: dict, **kwargs) -> nn.Module:
    """A timm model with hub weights (tag `where`) or randomly initialised, seeded by the config so
    random-init configs are reproducible; local files are loaded by the caller."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(config.get("init_seed", 0)))
        if source != "hub":
            return _timm_create(name, pretrained=False, **kwargs)
        try:
            return _timm_create(_hub_name(name, where), pretrained=True, **kwargs)
        except BackboneError:
            raise
        except Exception as e:  # noqa: BLE001 - offline hub errors come in many types
            raise _hub_error(config, where, e) from e


def create_timm_classifier(spec: str | dict | os.PathLike, pretrained: str | None = None) -> tuple[nn.Module, dict]:
    """The configured timm network with its classifier and the backbone's weights, in eval mode,
    plus its config. For checking that weights are really loaded (ImageNet predictions)."""
    cfg = load_backbone_config(spec)
    weights = pretrained if pretrained is not None else cfg.get("pretrained")
    kwargs = dict(cfg.get("model_kwargs") or {})
    if cfg.get("kind") == "timm_vit":
        kwargs.update(dynamic_img_size=True, img_size=int(cfg.get("model_img_size") or cfg["image_size"]))
    source, where = resolve_weights(weights)
    model = _timm_build(cfg["model"], source, where, cfg, **kwargs)
    if source == "file":
        _load_checked(model, prepare_state_dict(cfg, where, model), where, cfg)
    return model.eval(), cfg


def _normalisation(config: dict, reference: nn.Module) -> tuple[list[float], list[float]]:
    pcfg = getattr(reference, "pretrained_cfg", None) or {}
    mean = config.get("mean") or pcfg.get("mean") or (0.485, 0.456, 0.406)
    std = config.get("std") or pcfg.get("std") or (0.229, 0.224, 0.225)
    return list(mean), list(std)


# ---------------------------------------------------------------------------------------
# timm ViTs (DINOv2 family)
# ---------------------------------------------------------------------------------------

class TimmViTBackbone(Backbone):
    """A timm VisionTransformer; tokens of the chosen blocks (1-based `layers`) through
    `forward_intermediates`, prefix tokens (CLS and registers) dropped.

    Tokens are the raw residual stream of each block (config `"norm": true` passes them through
    the final LayerNorm first). The global embedding is timm's pooled pre-logits feature of the
    normed final output: the CLS token for DINOv2 (`global_pool='token'`). The model is built
    with `dynamic_img_size`, so any input that is a multiple of the patch works: timm resamples
    the position embedding of the native grid (`model_img_size`, default `image_size`).
    """

    def __init__(self, config: dict, pretrained: str | None = None):
        super().__init__(config)
        name = config["model"]
        kwargs = dict(config.get("model_kwargs") or {})
        kwargs.update(dynamic_img_size=True, img_size=int(config.get("model_img_size") or config["image_size"]))
        source, where = resolve_weights(pretrained)
        model = _timm_build(name, source, where, config, **kwargs)
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "blocks"):
            raise BackboneError(f"{name} is not a timm ViT with forward_intermediates; use kind 'timm_cnn' for CNNs")
        if source == "file":
            _load_checked(model, prepare_state_dict(config, where, model), where, config)
        n_blocks = len(model.blocks)
        bad = [l for l in self.layers if not 1 <= l <= n_blocks]
        if bad:
            raise BackboneError(f"layers {bad} out of range 1..{n_blocks} for {name} "
                                f"(backbone config '{config.get('name')}'; timm_vit layers are 1-based blocks)")
        self.model = model
        self.norm_tokens = bool(config.get("norm", False))
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.layer_dims = [int(model.embed_dim)] * len(self.layers)
        self.embed_dim = int(model.num_features)
        self._set_normalisation(*_normalisation(config, model))
        self._freeze()

    def _extract(self, x):
        h, w = x.shape[-2:]
        final, inter = self.model.forward_intermediates(
            x, indices=[l - 1 for l in self.layers], norm=self.norm_tokens, output_fmt="NLC")
        glob = self.model.forward_head(final, pre_logits=True)
        return inter, glob, (h // self.patch_size, w // self.patch_size)


# ---------------------------------------------------------------------------------------
# timm CNNs
# ---------------------------------------------------------------------------------------

def _feature_key(key: str, full_keys) -> str | None:
    """A features_only model's parameter name -> the full model's. timm's feature wrapper
    flattens top-level sequentials ('stem.0' becomes 'stem_0'), so try putting one '.' back."""
    if key in full_keys:
        return key
    head, dot, rest = key.partition(".")
    for i, ch in enumerate(head):
        if ch == "_":
            cand = head[:i] + "." + head[i + 1:] + dot + rest
            if cand in full_keys:
                return cand
    return None


class TimmCNNBackbone(Backbone):
    """A timm CNN with `features_only=True`; `layers` are 0-based feature stages (timm's
    `out_indices`: for ResNets 0 = stem (stride 2), 1..4 = layer1..layer4; for EfficientNets
    0..4 = the ends of strides 2, 4, 8, 16, 32).

    Every selected map is resized to one common grid (H / patch_size, W / patch_size), where
    `patch_size` is a config value: the stride of the token grid, not of any layer. Coarser
    maps are upsampled bilinearly; finer ones downsampled bilinearly with antialiasing, so a
    token averages its area instead of sampling one position. `"smooth": k` first averages
    each map over k x k neighbourhoods (PatchCore's local aggregation). The global embedding
    is the global average pool of the deepest selected map (before resizing).
    """

    def __init__(self, config: dict, pretrained: str | None = None):
        super().__init__(config)
        name = config["model"]
        if "patch_size" not in config:
            raise BackboneError(f"backbone config '{config.get('name')}': timm_cnn needs \"patch_size\", "
                                f"the stride of the token grid in pixels (e.g. 8)")
        self.patch_size = int(config["patch_size"])
        if self.patch_size < 1:
            raise BackboneError(f"patch_size must be >= 1, got {self.patch_size}")
        kwargs = dict(config.get("model_kwargs") or {})
        reference = _meta_model(name, kwargs)
        n_stages = len(getattr(reference, "feature_info", []) or [])
        bad = [l for l in self.layers if not 0 <= l < n_stages]
        if bad:
            raise BackboneError(f"layers {bad} out of range 0..{n_stages - 1} for {name} "
                                f"(backbone config '{config.get('name')}'; timm_cnn layers are 0-based stages)")
        if list(self.layers) != sorted(set(self.layers)):
            raise BackboneError(f"timm_cnn layers must be increasing stage indices, got {self.layers}")
        feat_kwargs = dict(kwargs, features_only=True, out_indices=tuple(self.layers))
        source, where = resolve_weights(pretrained)
        model = _timm_build(name, source, where, config, **feat_kwargs)
        if source == "file":
            self._load_file(model, reference, where, config)
        self.model = model
        self.smooth = int(config.get("smooth", 0) or 0)
        self.layer_dims = [int(c) for c in model.feature_info.channels()]
        self.reductions = [int(r) for r in model.feature_info.reduction()]
        self.embed_dim = self.layer_dims[-1]
        self._set_normalisation(*_normalisation(config, reference))
        self._freeze()

    @staticmethod
    def _load_file(model: nn.Module, reference: nn.Module, path: str, config: dict) -> None:
        full = prepare_state_dict(config, path, reference)
        full_keys = reference.state_dict().keys()
        unknown = [k for k in full if k not in full_keys]
        if unknown:
            raise BackboneError(
                f"{path} does not fit {config['model']} (backbone config '{config.get('name')}'): {len(unknown)} "
                f"file tensors unknown to the model (first: {unknown[:3]}); if the file names its tensors "
                f"differently, set \"remap\" in the backbone config (e.g. \"by_position\")")
        picked = {}
        for key in model.state_dict():
            src = _feature_key(key, full_keys)
            if src is None:
                raise BackboneError(f"{config['model']}: cannot match feature-model tensor '{key}' to the full model")
            if src in full:
                picked[key] = full[src]
        _load_checked(model, picked, path, config)  # reports tensors the file lacks

    def _extract(self, x):
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        maps = self.model(x)
        tokens = []
        for f in maps:
            # under autocast the stage maps are bf16/fp16: resize in fp32 (antialiased bilinear has no
            # bf16 CPU kernel, and these few ops are cheap); a no-op on the fp32 path
            f = f.float()
            if self.smooth > 1:
                f = F.avg_pool2d(f, self.smooth, stride=1, padding=self.smooth // 2, count_include_pad=False)
            if tuple(f.shape[-2:]) != grid:
                f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False, antialias=True)
            tokens.append(f.flatten(2).transpose(1, 2))
        return tokens, maps[-1].mean(dim=(-2, -1)), grid

    def signature(self) -> dict[str, Any]:
        sig = super().signature()
        sig["smooth"] = self.smooth
        return sig

