"""Peak memory of a stretch of work (test.py: per category), on the device that did it.

CUDA: the allocator's peak (torch.cuda.max_memory_allocated) since the reset. CPU: the process's
peak resident set (Linux VmHWM), reset by writing 5 to /proc/self/clear_refs; where that is not
possible the peak since the process started (ru_maxrss). CPU figures include the interpreter,
torch and the backbone weights: compare methods run the same way, not absolute values.
"""
from __future__ import annotations

import resource

import torch

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: the peak then counts from the process start
        pass


def _vm_hwm_kib() -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_mib(device: torch.device) -> float:
    """Peak memory in MiB since the last reset_peak (see the module docstring for what is counted)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    kib = _vm_hwm_kib()
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024
