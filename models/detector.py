"""FDSL detector: frozen backbone + reference banks + trainable heads -> anomaly maps and scores.

Shared by training (raw head outputs for the loss) and testing (maps at evaluation size and
image scores). Checkpoints hold only the heads, plus what they were trained on.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.backbones import Backbone, BackboneOutput, create_backbone
from models.fdsl import FDSL, FDSLOutput
from models.memory import ReferenceBank, align_to_banks
from utils.config import ModelConfig, from_dict

CHECKPOINT_FORMAT = "fdsl-heads/1"


class FDSLDetector(nn.Module):
    def __init__(self, backbone: Backbone, heads: FDSL):
        super().__init__()
        self.backbone = backbone
        self.heads = heads

    @classmethod
    def build(cls, model_cfg: ModelConfig, device="cpu") -> "FDSLDetector":
        backbone = create_backbone(model_cfg.backbone, device, model_cfg.pretrained, model_cfg.image_size)
        heads = FDSL(backbone.layer_dims, model_cfg.use_nam, model_cfg.hidden).to(device)
        return cls(backbone, heads)

    @property
    def image_size(self) -> int:
        return self.backbone.image_size

    @torch.no_grad()
    def build_bank(self, images: torch.Tensor, sources: Sequence[str] = (), batch_size: int = 8) -> ReferenceBank:
        """Reference bank of one category from its k normal images (k, 3, H, W) in [0, 1]."""
        device = self.backbone.mean.device
        parts = []
        for s in range(0, images.shape[0], batch_size):
            out = self.backbone(images[s:s + batch_size].to(device))
            parts.append(ReferenceBank(out.patch_tokens, out.global_embedding, out.grid))
        bank = ReferenceBank.concat(parts)
        bank.sources = list(sources)
        return bank

    def score(self, feats: BackboneOutput, banks: Sequence[ReferenceBank], use_image_index: bool = False) -> FDSLOutput:
        aligned = align_to_banks(feats.patch_tokens, banks, feats.global_embedding, use_image_index)
        return self.heads(feats.patch_tokens, aligned, feats.grid)

    @torch.no_grad()
    def predict_whole(self, images: torch.Tensor, bank: ReferenceBank, out_size: tuple[int, int],
                      use_image_index: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole-image path: anomaly maps (B, *out_size) and head scores (B,)."""
        feats = self.backbone(images)
        out = self.score(feats, [bank] * images.shape[0], use_image_index)
        return maps_and_scores(out.anomaly_maps(), out_size)


    @torch.no_grad()
    def predict_raw_distance(self, images: torch.Tensor, bank: ReferenceBank,
                             out_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Training-free baseline: 1 - cosine to the nearest reference patch, averaged over layers
        like the heads' maps. What the trained heads have to beat."""
        feats = self.backbone(images)
        aligned = align_to_banks(feats.patch_tokens, [bank] * images.shape[0])
        dist = torch.stack([(1 - (q * a).sum(-1)).reshape(-1, *feats.grid)
                            for q, a in zip(feats.patch_tokens, aligned)])
        return maps_and_scores(dist, out_size)


def maps_and_scores(layer_maps: torch.Tensor, out_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, B, h, w) per-layer anomaly maps on the patch grid -> (map (B, H, W), score (B,)).

    Map: mean over layers, upsampled bilinearly. Score: mean over layers of each layer map's
    maximum on the patch grid (before upsampling, as the authors did).
    """
    score = layer_maps.amax(dim=(-2, -1)).mean(0)
    mean_map = layer_maps.mean(0, keepdim=True).transpose(0, 1)  # (B, 1, h, w)
    up = F.interpolate(mean_map, size=tuple(out_size), mode="bilinear", align_corners=True)[:, 0]
    return up, score


def upsample_probs(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 2, h, w) probability maps -> (B, 2, size, size), as the loss sees them."""
    return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=True)


def final_image_scores(head_scores: torch.Tensor, map_max: torch.Tensor) -> torch.Tensor:
    """0.5 * (head score + map maximum min-max normalised over the category's test images)."""
    lo, hi = map_max.min(), map_max.max()
    norm = (map_max - lo) / (hi - lo) if hi > lo else torch.zeros_like(map_max)
    return 0.5 * (head_scores + norm)


# ---------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------

def checkpoint_payload(detector: FDSLDetector, model_cfg: ModelConfig, epoch: int,
                       optimizer: torch.optim.Optimizer | None = None, train_config: dict | None = None) -> dict:
    """Plain containers and tensors only, so `torch.load(weights_only=True)` reads it."""
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": int(epoch),
        "heads": detector.heads.state_dict(),
        "model_config": asdict(model_cfg),
        "backbone": detector.backbone.signature(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "train_config": train_config or {},
    }


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (train first with train.py or "
                                f"trainAndTest.sh, or pass --checkpoint)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an FDSL heads checkpoint (expected format '{CHECKPOINT_FORMAT}')")
    return ckpt


def check_backbone(ckpt_sig: dict, backbone: Backbone, path: str | Path = "checkpoint") -> None:
    mine = backbone.signature()
    keys = ("kind", "model", "layers", "layer_dims", "patch_size", "smooth")  # all change the features
    if any(ckpt_sig.get(k) != mine.get(k) for k in keys):
        desc = lambda s: f"{s.get('name')} ({s.get('kind')} {s.get('model')}, layers {s.get('layers')}, dims {s.get('layer_dims')})"
        raise ValueError(f"{path} was trained with backbone {desc(ckpt_sig)}, but the requested backbone is "
                         f"{desc(mine)}; use the same backbone (FDSL_BACKBONE / --backbone) or retrain")


def load_detector(path: str | Path, device="cpu", backbone: str | None = None,
                  pretrained: str | None = None, image_size: int | None = None) -> tuple[FDSLDetector, dict]:
    """Detector from a checkpoint; backbone, weights and size may be overridden (checked)."""
    ckpt = read_checkpoint(path)
    model_cfg = from_dict(ModelConfig, ckpt["model_config"])
    if backbone:
        model_cfg.backbone = backbone
    if pretrained:
        model_cfg.pretrained = pretrained
    if image_size:
        model_cfg.image_size = image_size
    detector = FDSLDetector.build(model_cfg, device)
    check_backbone(ckpt["backbone"], detector.backbone, path)
    detector.heads.load_state_dict(ckpt["heads"])
    detector.eval()
    return detector, ckpt
