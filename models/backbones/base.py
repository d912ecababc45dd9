"""What every backbone shares: the output type, the error type, the JSON configs in
`models/configs/` and the frozen base class whose subclasses implement `_extract`."""
from __future__ import annotations

import hashlib
import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.config import PRECISIONS  # noqa: F401 - re-exported: the values --precision takes
from utils.precision import resolve_precision  # noqa: F401 - re-exported: models and utils resolve alike

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"  # models/configs
DEFAULT_BACKBONE = "clip_vit_l14_336"


@dataclass
class BackboneOutput:
    patch_tokens: list[torch.Tensor]  # per layer (B, N, C_l), unit length (unless asked raw), row-major over the grid
    global_embedding: torch.Tensor  # (B, D), unit length
    grid: tuple[int, int]  # (rows, cols), N = rows * cols


class BackboneError(ValueError):
    """Raised with a message that names the config, file or option to fix."""


# Mixed precision of the frozen backbones (`--precision`, FSAD_PRECISION). Only the backbone
# forward runs under autocast: its tokens are cast back to fp32 before they are normalised, so
# banks, matching, heads, losses and metrics see fp32 tensors whatever the choice.
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
        self._weights_identity: dict | None = None
        self._precision: str | None = None

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
    def forward(self, images: torch.Tensor, normalize_tokens: bool = True) -> BackboneOutput:
        """`normalize_tokens=False`: the patch tokens as the network gives them (fp32), for methods
        that model raw feature statistics (subspacead's PCA); the global embedding stays unit length."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"backbone expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        x = (images.to(self.mean.device, self.mean.dtype) - self.mean) / self.std
        with self._autocast(x.device):
            tokens, glob, grid = self._extract(x)
        # cast back first: normalising in bf16 would round every unit vector again
        return BackboneOutput(
            patch_tokens=[F.normalize(t.float(), dim=-1) if normalize_tokens else t.float() for t in tokens],
            global_embedding=F.normalize(glob.float(), dim=-1),
            grid=grid,
        )

    def weights_identity(self) -> dict[str, Any]:
        """Which weights the extractor holds: `source` (tag or file name, for people) and `sha256`
        over the first and last parameter plus the parameter count (compared: the same weights at
        another path or from another download match; other weights do not). The weights are frozen,
        so it is computed once."""
        if self._weights_identity is None:
            params = [p for _, p in self.named_parameters()]
            h = hashlib.sha256(str(sum(p.numel() for p in params)).encode())
            for p in (params[:1] + params[-1:]) if params else []:
                # float32 bytes: fp16 (OpenAI's archive) and fp32 copies of the same weights agree
                h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
            source = self.config.get("pretrained")
            if source is None:
                source = f"random (init_seed {int(self.config.get('init_seed', 0))})"
            elif os.sep in str(source) or "/" in str(source):
                source = Path(str(source)).name  # the path differs between machines
            self._weights_identity = {"source": str(source), "sha256": h.hexdigest()}
        return dict(self._weights_identity)
    @property
    def precision(self) -> str | None:
        """None (unset) and "fp32" run exactly the fp32 path; "bf16"/"fp16" autocast `_extract` only.
        Set a resolved value (resolve_precision): 'auto' depends on the device."""
        return self._precision

    @precision.setter
    def precision(self, value: str | None) -> None:
        if value not in (None, "fp32", *_DTYPES):
            raise ValueError(f"backbone precision must be fp32, bf16, fp16 or None (resolve 'auto' first), "
                             f"got {value!r}")
        self._precision = value

    def _autocast(self, device: torch.device):
        if self._precision is None:
            return contextlib.nullcontext()  # unset: exactly the code path before precision existed
        if self._precision == "fp32":  # also shields the backbone from an autocast the caller opened
            return torch.autocast(device_type=device.type, enabled=False)
        return torch.autocast(device_type=device.type, dtype=_DTYPES[self._precision])

    def signature(self) -> dict[str, Any]:
        """What a checkpoint must agree on: heads are only valid for the features they saw
        (`image_size` is recorded to warn when a test runs at another size)."""
        return {
            "name": self.config.get("name"),
            "kind": self.config["kind"],
            "model": self.config.get("model"),
            "layers": self.layers,
            "layer_dims": self.layer_dims,
            "patch_size": self.patch_size,
            "image_size": self.image_size,
            "weights": self.weights_identity(),
        }

