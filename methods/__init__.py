"""Methods behind one factory, as backbones are: a registry name -> class, and a JSON config per
method in methods/configs/ (its backbones by role, its parameters, its training defaults).

    resolved = resolve_method_config(MethodConfig(name="fdsl", backbone="tiny_clip"))
    method = create_method(resolved, device)

The resolved config is what a checkpoint stores, so a method is rebuilt exactly from it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from methods.anomalydino import AnomalyDINOMethod
from methods.base import InferenceOptions, Method
from methods.dcpsfr import DCPSFRMethod
from methods.fdsl import FDSLMethod
from methods.knn import KNNMethod
from methods.subspacead import SubspaceADMethod
from models.backbones import create_backbone, load_backbone_config

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (FDSLMethod, DCPSFRMethod, KNNMethod, AnomalyDINOMethod,
                                                                    SubspaceADMethod)}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    return sorted(METHODS)


def load_method_config(spec: str | os.PathLike | dict) -> dict:
    """A method name (methods/configs/<name>.json), a path to a JSON file, or a dict."""
    if isinstance(spec, dict):
        return json.loads(json.dumps(spec))
    path = Path(spec)
    if not path.suffix:
        path = CONFIG_DIR / f"{spec}.json"
    if not path.is_file():
        raise ValueError(f"method '{spec}' not found (looked for {path}); known methods: {', '.join(list_methods())}")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"method config {path} is not valid JSON ({e})") from e
    if cfg.get("method") not in METHODS:
        raise ValueError(f"method config {path}: 'method' must be one of {list_methods()}, got {cfg.get('method')!r}")
    return cfg


def split_roles(value: str | None, roles: list[str], what: str) -> dict[str, str]:
    """'NAME' (the method's first backbone) or 'role=NAME,role=NAME' -> {role: NAME}."""
    if value is None or str(value).strip() == "":
        return {}
    value = str(value).strip()
    if "=" not in value:
        return {roles[0]: value}
    out = {}
    for part in value.split(","):
        role, sep, name = part.partition("=")
        role, name = role.strip(), name.strip()
        if not sep or role not in roles or not name:
            raise ValueError(f"{what} '{value}': expected NAME or role=NAME[,role=NAME] with roles {roles}")
        out[role] = name
    return out


def resolve_method_config(request) -> dict:
    """A run's method request (utils.config.MethodConfig) -> the full method config: the JSON's
    parameters with the request's overrides, each backbone as {"config", "pretrained"}."""
    cfg = load_method_config(request.name)
    cfg.pop("description", None)
    roles = list(cfg["backbones"])
    backbones = {role: spec if isinstance(spec, dict) else {"config": spec, "pretrained": None}
                 for role, spec in cfg["backbones"].items()}
    for role, name in split_roles(request.backbone, roles, "backbone").items():
        backbones[role] = {**backbones[role], "config": name}
    for role, weights in split_roles(request.pretrained, roles, "pretrained").items():
        backbones[role] = {**backbones[role], "pretrained": weights}
    cfg["backbones"] = backbones
    cfg["image_size"] = request.image_size or cfg.get("image_size")
    unknown = [k for k in request.params if k not in cfg]
    if unknown:
        known = [k for k in cfg if k not in ("method", "backbones", "image_size", "training")]
        raise ValueError(f"method '{cfg['method']}' has no parameter {unknown}; its parameters: {known}")
    cfg.update(json.loads(json.dumps(request.params)))
    METHODS[cfg["method"]].validate_config(cfg)
    return cfg


def create_method(config: dict, device: str | torch.device = "cpu") -> Method:
    """Backbones first (their random init is forked from the global RNG), then the heads, which
    draw from the global RNG: seed it before calling for reproducible heads."""
    cls = METHODS.get(config.get("method"))
    if cls is None:
        raise ValueError(f"unknown method {config.get('method')!r}; known: {', '.join(list_methods())}")
    cls.validate_config(config)
    backbones = {}
    for role, spec in config["backbones"].items():
        bcfg = load_backbone_config(spec["config"])
        bcfg.update(cls.backbone_options.get(role, {}))
        backbones[role] = create_backbone(bcfg, device, spec.get("pretrained"), config.get("image_size"))
    return cls.build(config, backbones)


DEFAULT_TRAIN_K_SHOT, DEFAULT_AUGMENT = 10, "mosaic"  # FDSL's authors' effective values


def training_references(method_cfg: dict, dataset_augment: str = DEFAULT_AUGMENT) -> tuple[int, str]:
    """A resolved method config's training references and augmentation (`training.train_k_shot`,
    `training.augment`), else 10 and the dataset's augmentation; augment "authors" = the
    dataset's (`dataset_augment`: the launchers know it, train.py assumes mosaic)."""
    training = method_cfg.get("training", {})
    augment = training.get("augment", "authors")
    return int(training.get("train_k_shot", DEFAULT_TRAIN_K_SHOT)), dataset_augment if augment == "authors" else augment


__all__ = ["METHODS", "InferenceOptions", "Method", "create_method", "list_methods", "load_method_config",
           "register", "resolve_method_config", "split_roles", "training_references"]
