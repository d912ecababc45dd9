"""DCP-SFR as a method: CLIP (with its text tower) and DINOv2, frozen, feed the trainable parts
of models/dcpsfr.py (prompts, CACA, ACL, SSR, global-local image score).

Reference state of a category: the position-wise mean of the K references' DINOv2 patch tokens
(ACL's key/value), their class tokens (global score) and a clustered bank of all their patch
tokens (SSR). Both backbones run on the same input, so their /14 patch grids coincide.
"""
from __future__ import annotations

import inspect
from typing import Sequence

import torch
import torch.nn as nn

from methods.base import Method
from models.backbones import Backbone
from models.dcpsfr import (ALPHA_BETA, FUSIONS, GLOBAL_SCORES, DCPSFRHeads, DCPSFRReference, PromptLearner,
                           build_reference, collate_references, dcpsfr_loss)
from models.scoring import upsample_probs

_HEAD_ARGS = set(inspect.signature(DCPSFRHeads.__init__).parameters) - {"self", "clip_dim", "n_clip_layers", "dino_dim"}
_OWN_KEYS = {"method", "backbones", "image_size", "training", "anomaly_word", "bank_size", "focal_alpha",
             "focal_gamma", "alpha_beta", "edge_loss"}
# the choices a config key takes, checked before any model is built
_CHOICES = {"global_score": GLOBAL_SCORES, "fusion": FUSIONS, "alpha_beta": ALPHA_BETA, "init": ("identity", "scratch")}
# DCP-SFR's own training settings (methods/configs/dcpsfr.json "training"); the launchers' and
# train.py's options override them
_AUGMENTS = ("none", "mosaic", "crop", "authors")
_SWITCHES = ("use_caca", "use_acl", "use_ssr", "adapter", "edge_loss")


class DCPSFRMethod(Method):
    name = "dcpsfr"
    # CACA compares intermediate CLIP tokens with text: keep the text tower, project the tokens into
    # the joint space; ACL/SSR use DINOv2's final-normed tokens (its usual output space)
    backbone_options = {"clip": {"keep_text": True, "project_tokens": True}, "dino": {"norm": True}}
    ablations = {"no_caca": {"use_caca": False}, "no_acl": {"use_acl": False}, "no_ssr": {"use_ssr": False}}

    def __init__(self, backbones: dict[str, Backbone], config: dict):
        super().__init__(backbones, config)
        clip, dino = backbones["clip"], backbones["dino"]
        if clip.patch_size != dino.patch_size:
            raise ValueError(f"dcpsfr needs one patch grid for both backbones: CLIP patch {clip.patch_size}, "
                             f"DINOv2 patch {dino.patch_size}")
        kwargs = {k: v for k, v in config.items() if k in _HEAD_ARGS}
        # every config resolved from methods/configs/dcpsfr.json names its global score; one without
        # the key comes from a checkpoint written before the paper's score existed: rebuild that one
        kwargs.setdefault("global_score", "attention")
        heads = {"heads": DCPSFRHeads(clip.layer_dims[0], len(clip.layers), dino.layer_dims[-1], **kwargs)}
        if config.get("use_caca", True):
            if getattr(clip, "text_encoder", None) is None:
                raise ValueError(f"dcpsfr: the CLIP backbone '{clip.config.get('name')}' has no text tower")
            heads["prompts"] = PromptLearner(clip.text_encoder, int(config.get("n_ctx", 12)),
                                             config.get("anomaly_word", "damaged"))
        self.heads = nn.ModuleDict(heads).to(self.device)

    @classmethod
    def validate_config(cls, config: dict) -> None:
        unknown = set(config) - _HEAD_ARGS - _OWN_KEYS - {"description"}
        if unknown:
            raise ValueError(f"dcpsfr: unknown parameters {sorted(unknown)}")
        bad = [k for k in _SWITCHES if not isinstance(config.get(k, True), bool)]
        if bad:
            raise ValueError(f"dcpsfr: {bad} must be true or false")
        if not (config.get("use_acl", True) or config.get("use_ssr", True)):
            raise ValueError("dcpsfr: without ACL and SSR there is no segmentation score; keep one of them")
        if int(config.get("bank_size", 1024)) < 1:
            raise ValueError(f"dcpsfr: bank_size must be >= 1, got {config.get('bank_size')}")
        for key, choices in _CHOICES.items():
            if key in config and config[key] not in choices:
                raise ValueError(f"dcpsfr: {key} must be one of {', '.join(choices)}, got {config[key]!r}")
        training = config.get("training", {})
        k = training.get("train_k_shot", 1)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"dcpsfr: training.train_k_shot must be an integer >= 1, got {k!r}")
        if training.get("augment", "none") not in _AUGMENTS:
            raise ValueError(f"dcpsfr: training.augment must be one of {', '.join(_AUGMENTS)}, "
                             f"got {training.get('augment')!r}")
        if set(config.get("backbones", {})) != {"clip", "dino"}:
            raise ValueError(f"dcpsfr needs backbones 'clip' and 'dino', got {sorted(config.get('backbones', {}))}")

    @classmethod
    def checkpoint_tag(cls, config: dict) -> str:
        return cls.name

    def fit(self, images: torch.Tensor, sources: Sequence[str] = (), batch_size: int = 8, *,
            category: str | None = None) -> DCPSFRReference:
        outs = self.encode(images, "dino", batch_size)
        tokens = torch.cat([o.patch_tokens[-1] for o in outs])
        cls_tokens = torch.cat([o.global_embedding for o in outs])
        return build_reference(tokens, cls_tokens, int(self.config.get("bank_size", 1024)))

    def forward_batch(self, images: torch.Tensor, states: Sequence[DCPSFRReference]):
        images = images.to(self.device)
        dino = self.backbones["dino"](images)
        clip_tokens = text = clip_cls = None
        if "prompts" in self.heads:
            clip = self.backbones["clip"](images)
            if clip.grid != dino.grid:
                raise ValueError(f"CLIP grid {clip.grid} differs from DINOv2 grid {dino.grid}")
            clip_tokens, text, clip_cls = clip.patch_tokens, self.heads["prompts"](), clip.global_embedding
        refs = collate_references(states)
        return self.heads["heads"](clip_tokens, text, dino.patch_tokens[-1], dino.global_embedding,
                                   refs["ref_mean"], refs["ref_cls"], refs["bank"], dino.grid, clip_cls=clip_cls)

    def loss(self, batch: dict, states: Sequence[DCPSFRReference]) -> torch.Tensor:
        out = self.forward_batch(batch["image"], states)
        total, _ = dcpsfr_loss(out, batch["mask"].to(self.device), batch["label"].to(self.device),
                               alpha=float(self.config.get("focal_alpha", 0.9)),
                               gamma=float(self.config.get("focal_gamma", 2.0)),
                               use_edge=bool(self.config.get("edge_loss", True)),
                               alpha_beta=self.config.get("alpha_beta", "focal"))
        return total

    @torch.no_grad()
    def predict(self, images: torch.Tensor, state: DCPSFRReference, out_size: tuple[int, int]):
        """Map: the calibrated segmentation probability upsampled; score: the fused image logit
        y_global + mu * y_local (a logit keeps rankings exact where a sigmoid would saturate)."""
        out = self.forward_batch(images, [state] * images.shape[0])
        return upsample_probs(out.seg_prob.unsqueeze(1), out_size)[:, 0], out.image_logit

    def state_nbytes(self, state: DCPSFRReference) -> dict[str, int]:
        return {"bank_bytes": sum(t.numel() * t.element_size() for t in (state.ref_mean, state.ref_cls, state.bank))}
