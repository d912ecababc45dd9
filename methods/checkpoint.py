"""Checkpoints of any method: {format, method, method_config, backbones (signatures), state, ...}.

Only plain containers and tensors, so `torch.load(weights_only=True)` reads them. A checkpoint
is refused by another method and by other backbones, naming both.
"""
from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import torch

from methods import create_method, resolve_method_config, split_roles
from methods.base import Method

FORMAT = "fsad-method/1"
LEGACY_FDSL = "fdsl-heads/1"  # written before methods had one interface; read as fdsl
# signature keys that change the features a head sees
FEATURE_KEYS = ("kind", "model", "layers", "layer_dims", "patch_size", "smooth", "project_tokens")


def json_copy(obj):
    """A deep copy of plain JSON data (parameter values)."""
    return json.loads(json.dumps(obj))


def to_cpu(obj):
    """Every tensor of a (nested) state dict on the CPU: a checkpoint written on a GPU is read by
    plain torch.load(weights_only=True) on a machine without one (the optimizer moves its state
    back to its parameters' device when it loads it)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        out = type(obj)((k, to_cpu(v)) for k, v in obj.items())  # an OrderedDict stays one
        if hasattr(obj, "_metadata"):  # a state dict's module versions, read by load_state_dict
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def checkpoint_payload(method: Method, epoch: int, optimizer: torch.optim.Optimizer | None = None,
                       train_config: dict | None = None) -> dict:
    return {
        "format": FORMAT,
        "method": method.name,
        "method_config": method.config,
        "backbones": method.backbone_signatures(),
        "state": to_cpu(method.heads.state_dict()) if method.heads is not None else {},
        "epoch": int(epoch),
        "optimizer": to_cpu(optimizer.state_dict()) if optimizer is not None else None,
        "train_config": train_config or {},
    }


def _from_legacy(ckpt: dict) -> dict:
    m = ckpt.get("model_config", {})
    config = {"method": "fdsl", "backbones": {"backbone": {"config": m.get("backbone"), "pretrained": m.get("pretrained")}},
              "image_size": m.get("image_size"), "use_nam": bool(m.get("use_nam", True)),
              "hidden": list(m.get("hidden", (512, 128, 32)))}
    return {**ckpt, "format": FORMAT, "method": "fdsl", "method_config": config,
            "backbones": {"backbone": ckpt.get("backbone", {})}, "state": ckpt.get("heads", {})}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message is one line naming the file."""


class DamagedCheckpointError(CheckpointError):
    """Empty, truncated or otherwise unreadable: training falls back to the epoch before."""


def _load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # Only a GLOBAL (a reference to a class or function) can bring code along; torch's text
        # suggests weights_only=False, i.e. running it: never repeat that. Other refusals of torch's
        # safe unpickler (unknown opcodes, ...) mean garbage: handled as damage below.
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:
            raise CheckpointError(f"{path} is not a plain tensor checkpoint: it holds pickled Python objects or "
                                  f"code (it references {found.group(1)}), and is refused because loading it "
                                  f"could run that code; use a checkpoint written by train.py") from None
        return _damaged(path, e)
    except Exception as e:  # torch reports damage as RuntimeError, EOFError, KeyError, ... by format
        return _damaged(path, e)


def _damaged(path: Path, e: Exception):
    size = path.stat().st_size
    if size == 0:
        raise DamagedCheckpointError(f"cannot read checkpoint {path}: the file is empty") from None
    # torch's RuntimeError names what broke (e.g. the zip directory); other types say little
    detail = f"; {str(e).split('. ')[0].splitlines()[0]}" if isinstance(e, RuntimeError) and str(e) else ""
    raise DamagedCheckpointError(f"cannot read checkpoint {path}: the file is damaged, truncated or not a "
                                 f"torch checkpoint ({size} bytes{detail})") from None


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint's content; CheckpointError (one line naming the file) when it is damaged, holds
    pickled code or is not a method checkpoint of this codebase."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (train first with train.py or "
                                f"trainAndTest.sh, or pass --checkpoint)")
    ckpt = _load(path)
    if isinstance(ckpt, dict) and ckpt.get("format") == LEGACY_FDSL:
        return _from_legacy(ckpt)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a method checkpoint of this codebase (expected format '{FORMAT}')")
    return ckpt


def check_method(ckpt: dict, wanted: str | None, path: str | Path = "checkpoint") -> None:
    if wanted and ckpt["method"] != wanted:
        raise ValueError(f"{path} holds a checkpoint of method '{ckpt['method']}', but method '{wanted}' was "
                         f"asked for; use a checkpoint trained with --method {wanted} (launchers: METHOD={wanted})")


def check_backbones(stored: dict[str, dict], method: Method, path: str | Path = "checkpoint") -> None:
    mine = method.backbone_signatures()
    for role, sig in mine.items():
        old = stored.get(role, {})
        # the activation is recorded since the backbone package; older checkpoints lack it
        activation = "quick_gelu" in old and old["quick_gelu"] != sig.get("quick_gelu")
        if activation or any(old.get(k) != sig.get(k) for k in FEATURE_KEYS):
            desc = lambda s: (f"{s.get('name')} ({s.get('kind')} {s.get('model')}, layers {s.get('layers')}, "
                              f"dims {s.get('layer_dims')}, quick_gelu {s.get('quick_gelu')})")
            raise ValueError(f"{path} was trained with backbone {desc(old)}, but the requested backbone is "
                             f"{desc(sig)}; use the same backbone (FSAD_BACKBONE / --backbone) or retrain")
        _check_weights_and_size(role, old, sig, path)


def _check_weights_and_size(role: str, old: dict, sig: dict, path) -> None:
    """Other weights are refused (compared by content hash, so the same file elsewhere is fine);
    another input size is a deliberate test setting (--image-size) and only warned about. Both are
    recorded since the weights identity was added; older checkpoints are not checked."""
    was, now = old.get("weights"), sig.get("weights") or {}
    if isinstance(was, dict) and was.get("sha256") != now.get("sha256"):
        raise ValueError(f"{path} was trained on the {role} weights '{was.get('source')}' (sha256 "
                         f"{str(was.get('sha256'))[:12]}), but the weights loaded now, '{now.get('source')}', "
                         f"differ in content (sha256 {str(now.get('sha256'))[:12]}); pass the training weights "
                         f"(FSAD_PRETRAINED / --pretrained: the same file at another path is fine) or retrain")
    if "image_size" in old and old["image_size"] != sig.get("image_size"):
        logging.getLogger("fsad.checkpoint").warning(
            "%s was trained at %s px, the %s backbone now runs at %s px: the heads see features of another "
            "scale", path, old["image_size"], role, sig.get("image_size"))


def test_time_params(method: str, params: dict | None, path: str | Path = "checkpoint") -> dict:
    """`params` checked against the test-time parameters of a trained `method` (Method.test_params)."""
    from methods import METHODS

    allowed = METHODS[method].test_params if method in METHODS else ()
    refused = sorted(k for k in (params or {}) if k not in allowed)
    if refused:
        extra = (f"; on a {method} checkpoint only its test-time parameters ({', '.join(allowed)})"
                 if allowed else "")
        raise ValueError(f"{path}: method parameters ({', '.join(refused)}) can be set for training-free methods "
                         f"only{extra}; a checkpoint's other parameters are fixed by its training")
    return dict(params or {})


def check_checkpoint_params(checkpoint: str | Path, params: dict | None) -> None:
    """Before the file is read (test.py: before any folder is written): a parameter that no method
    takes at test time cannot be set on any checkpoint."""
    if not params:
        return
    from methods import METHODS

    any_method = sorted({k for cls in METHODS.values() for k in cls.test_params})
    refused = sorted(k for k in params if k not in any_method)
    if refused:
        raise ValueError(f"{checkpoint}: method parameters ({', '.join(refused)}) can be set for training-free "
                         f"methods only, and on a checkpoint only test-time parameters "
                         f"({', '.join(any_method)}); a checkpoint's others are fixed by its training")


def load_method(path: str | Path, device="cpu", method: str | None = None, backbone: str | None = None,
                pretrained: str | None = None, image_size: int | None = None,
                params: dict | None = None) -> tuple[Method, dict]:
    """A trained method from its checkpoint, in eval mode; backbone configs, weights and input size
    may be overridden (`backbone`/`pretrained`: NAME or role=NAME,...), and are checked. `params`:
    the method's test-time parameters (Method.test_params, e.g. fdsl's bn_stats); those not given
    take the method config's defaults, so the returned method_config names every one of them."""
    from methods import METHODS, load_method_config

    ckpt = read_checkpoint(path)
    check_method(ckpt, method, path)
    params = test_time_params(ckpt["method"], params, path)
    config = ckpt["method_config"]
    test_keys = METHODS[ckpt["method"]].test_params
    if test_keys:
        defaults = load_method_config(ckpt["method"])
        for key in test_keys:
            config.setdefault(key, defaults.get(key))
    config.update(json_copy(params))
    roles = list(config["backbones"])
    for role, name in split_roles(backbone, roles, "backbone").items():
        config["backbones"][role]["config"] = name
    for role, weights in split_roles(pretrained, roles, "pretrained").items():
        config["backbones"][role]["pretrained"] = weights
    if image_size:
        config["image_size"] = int(image_size)
    built = create_method(config, device)
    check_backbones(ckpt["backbones"], built, path)
    if built.heads is not None:
        built.heads.load_state_dict(ckpt["state"])
    built.eval()
    return built, ckpt


def build_method(checkpoint: str | Path | None, method: str | None = None, backbone: str | None = None,
                 pretrained: str | None = None, image_size: int | None = None,
                 device="cpu", params: dict | None = None) -> tuple[Method, dict]:
    """The method test.py and predict.py run, in eval mode: the checkpoint's trained method (checked
    against `method`/`backbone`, see load_method), or without a checkpoint a training-free `method`
    built from its config. The dict: the checkpoint, or for a training-free method {method,
    method_config, backbones (signatures), epoch None, train_config {}}. `params`: overrides of a
    training-free method's parameters, or a checkpoint's test-time parameters (Method.test_params: fdsl's
    bn_stats, fd_merge); a checkpoint's other parameters are fixed by its training."""
    if checkpoint:
        check_checkpoint_params(checkpoint, params)
        return load_method(checkpoint, device, method, backbone, pretrained, image_size, params)
    from utils.config import MethodConfig

    method_cfg = resolve_method_config(MethodConfig(name=method, backbone=backbone, pretrained=pretrained,
                                                    image_size=image_size, params=dict(params or {})))
    built = create_method(method_cfg, device)
    if built.trainable:
        raise ValueError(f"method '{built.name}' must be trained first: pass --checkpoint (train.py or "
                         f"trainAndTest.sh writes it)")
    built.eval()
    return built, {"method": built.name, "method_config": method_cfg, "backbones": built.backbone_signatures(),
                   "epoch": None, "train_config": {}}
