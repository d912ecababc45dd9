"""Which autocast precision a device runs (`--precision`, FSAD_PRECISION): 'auto' made concrete
and explicit values checked against the device. Here, not beside the backbones that apply it, so
utils/distributed.py can resolve a run's precision without importing models/."""
from __future__ import annotations

import torch

from utils.config import PRECISIONS


def _cuda_bf16(device: torch.device, native: bool) -> bool:
    with torch.cuda.device(device):  # is_bf16_supported asks about the current device
        return torch.cuda.is_bf16_supported(including_emulation=not native)


def resolve_precision(precision: str | None, device: str | torch.device) -> str:
    """'auto' -> what this device runs best: bf16 on a CUDA GPU with native bf16 (Ampere and
    later), fp16 on an older one, fp32 on CPU (where bf16 is often emulated, so it stays opt-in).
    Explicit values are checked against the device."""
    p = "auto" if precision is None else str(precision).strip().lower()
    if p not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if p == "auto":
        return ("bf16" if _cuda_bf16(dev, native=True) else "fp16") if cuda else "fp32"
    if p == "bf16" and cuda and not _cuda_bf16(dev, native=False):
        raise ValueError(f"precision bf16: the GPU {dev} has no bfloat16 support; use fp16 or auto")
    if p == "fp16" and not cuda:
        # fp16 is the fallback for GPUs without bf16; its 65504 range is the risk for raw ViT
        # residual streams, and CPUs gain nothing from it over bf16
        raise ValueError("precision fp16 is for CUDA GPUs without bf16; on CPU use bf16 or fp32")
    return p
