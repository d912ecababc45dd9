"""Moving data between host and device once, without waiting for the GPU in the per-batch path.

A copy to the GPU from pinned memory with `non_blocking=True` is queued behind the running
kernels instead of stalling the host; a copy back with `non_blocking=True` lands in pinned host
memory and is only valid after `synchronize`. On CPU all of this is a no-op.
"""
from __future__ import annotations

from typing import Any

import torch


def loader_options(workers: int, device: torch.device) -> dict:
    """DataLoader keywords: worker processes decode images while the device computes; pinned
    batches make the host-to-device copy asynchronous (CUDA only: pinning costs time on CPU)."""
    return {"num_workers": int(workers), "pin_memory": torch.device(device).type == "cuda"}


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor of a (nested) batch on `device`, copied asynchronously; other values as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not isinstance(batch, str):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy queued behind the kernels that produce `t` (pinned memory): read it only after
    `synchronize(device)`. A CPU tensor is returned as it is, as `.cpu()` does."""
    return t.to("cpu", non_blocking=True)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, including `to_host` copies (once per category or epoch)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
