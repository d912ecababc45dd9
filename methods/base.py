"""The one interface every method implements, so training and evaluation loops are written once.

A method is an `nn.Module` that holds its frozen backbones (by role, e.g. "clip", "dino") and its
trainable part (`heads`, or None for training-free methods). Its surface:

    fit(ref_images, sources, category=...) -> per-category reference state (banks, means, ...)
    loss(batch, states)             -> training loss for one batch (trainable methods)
    predict(images, state, size)    -> anomaly maps (B, H, W) and raw image scores (B,)
    image_scores(scores, maps)      -> final image scores of one category's test images
    configure(options)              -> inference options (LFE windows) before fit/predict

The loops never look inside a state or the heads; checkpoints hold the heads' state dict.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
import torch.nn as nn

from models.backbones import Backbone


@dataclass(frozen=True)
class InferenceOptions:
    """Run settings that change how a test image is scored (not what was trained)."""
    winmode: str = "nan"  # nan: whole image; mul: blend whole and windows; onlywin: windows only
    win_size: int = 13  # window side in patches
    win_stride: int = 2  # window stride in patches
    win_weight: float = 0.5  # weight of the windows in 'mul'
    image_index: str = "windows"  # where matching uses only the most similar reference: off|windows|all
    window_batch: int = 64  # windows per backbone forward
    # backbone autocast: 'fp32', 'bf16', 'fp16' or 'auto' (resolved for the method's device);
    # None leaves the backbones as they are. configure() applies it (predict.py: pass it here)
    precision: str | None = None


class Method(nn.Module):
    """Base class. Subclasses set `name`, build their heads in `build` and implement the surface."""

    name: ClassVar[str] = ""
    trainable: ClassVar[bool] = True
    # extra create_backbone options a method needs per role (e.g. DCP-SFR: CLIP's text tower)
    backbone_options: ClassVar[dict[str, dict]] = {}
    # named parameter sets that reproduce ablation rows (launchers: ABLATION=name)
    ablations: ClassVar[dict[str, dict]] = {}
    # parameters that act at test time only, so they may be set on a trained checkpoint (test.py and
    # predict.py --param); every other parameter of a trained method is fixed by its training
    test_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, backbones: dict[str, Backbone], config: dict | None = None):
        super().__init__()
        if not backbones:
            raise ValueError(f"method '{self.name}' needs at least one backbone")
        sizes = {role: b.image_size for role, b in backbones.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"method '{self.name}': backbones must share one input size, got {sizes}")
        self.backbones = nn.ModuleDict(backbones)
        self.config = dict(config or {})
        self.heads: nn.Module | None = None
        self.options = InferenceOptions()

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def build(cls, config: dict, backbones: dict[str, Backbone]) -> "Method":
        return cls(backbones, config)

    @classmethod
    def checkpoint_tag(cls, config: dict) -> str:
        """Names the training settings in checkpoint folders (launchers)."""
        return cls.name

    @classmethod
    def validate_config(cls, config: dict) -> None:
        """Refuse unknown or ill-typed method parameters before any work."""

    # -- properties ------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return next(iter(self.backbones.values())).image_size

    @property
    def device(self) -> torch.device:
        return next(iter(self.backbones.values())).mean.device

    def backbone_signatures(self) -> dict[str, dict]:
        return {role: b.signature() for role, b in self.backbones.items()}

    def set_precision(self, precision: str | None) -> str | None:
        """Autocast dtype of every frozen backbone ('auto' is resolved for this method's device);
        returns the value applied. Heads, banks, losses and maps stay fp32 (Backbone.forward)."""
        from models.backbones import resolve_precision

        resolved = None if precision is None else resolve_precision(precision, self.device)
        for backbone in self.backbones.values():
            backbone.precision = resolved
        return resolved

    @property
    def precision(self) -> str | None:
        return next(iter(self.backbones.values())).precision

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.heads.parameters() if p.requires_grad] if self.heads is not None else []

    # -- inference options -------------------------------------------------------------------
    def configure(self, options: InferenceOptions) -> None:
        if options.winmode != "nan":
            raise ValueError(f"method '{self.name}' scores whole images only; winmode '{options.winmode}' "
                             f"(LFE windows) is available for fdsl, knn and anomalydino; use winmode nan")
        if options.precision is not None:
            self.set_precision(options.precision)
        self.options = options

    # -- the surface ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor, role: str, batch_size: int = 8):
        """Backbone outputs of `images` in chunks, moved to the method's device."""
        backbone = self.backbones[role]
        return [backbone(images[s:s + batch_size].to(self.device)) for s in range(0, images.shape[0], batch_size)]

    def fit(self, images: torch.Tensor, sources: Sequence[str] = (), batch_size: int = 8, *,
            category: str | None = None) -> Any:
        """`category`: the product's name where known (test.py: the dataset category; predict.py:
        --category), for methods whose behaviour depends on it (anomalydino's masking)."""
        raise NotImplementedError

    def loss(self, batch: dict, states: Sequence[Any]) -> torch.Tensor:
        raise NotImplementedError(f"method '{self.name}' has no training step")

    def predict(self, images: torch.Tensor, state: Any, out_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def image_scores(self, scores: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """Final image scores of one category from the raw scores and maps of all its test images."""
        return scores

    def state_nbytes(self, state: Any) -> dict[str, int]:
        """Bytes held per category (reported in metrics.json)."""
        return {}

    def state_info(self, state: Any) -> dict:
        """What metrics.json reports about a category's reference state: its bytes, and what a method
        decided per category (anomalydino: whether its test patches are foreground-masked)."""
        return self.state_nbytes(state)
