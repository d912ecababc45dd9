"""Atomic file writes: a crash or Ctrl-C never leaves a half-written result behind."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def _atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        # name the file the caller asked for, not the hidden temporary one
        e.filename = str(path)
        raise
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class OutputError(OSError):
    """An output folder that cannot be used (not writable, or held by another run); the message is one
    line naming the folder, so entry points print it without a traceback."""


def check_writable(folder: str | os.PathLike, what: str = "output folder") -> None:
    """Raise OutputError unless `folder` exists as a writable folder or could be created: called before
    the expensive work, so a run does not stop at its first write after hours of compute."""
    folder = Path(os.path.abspath(folder))
    existing = folder
    try:
        while not existing.exists():
            existing = existing.parent
        is_dir = existing.is_dir()
    except OSError as e:  # e.g. a parent that cannot be searched
        raise OutputError(f"cannot write the {what} {folder}: {e.strerror or e}") from None
    if not is_dir:
        raise OutputError(f"cannot write the {what} {folder}: {existing} is a file, not a folder")
    # W_OK is also False on a read-only file system or an immutable folder, even for root
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == folder else f" ({existing} is the nearest existing folder)"
        raise OutputError(f"cannot write the {what} {folder}: permission denied or read-only{where}")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return _atomic(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return _atomic(path, lambda p: p.write_bytes(data))


def _json_safe(obj: Any) -> Any:
    # NaN is not valid JSON; undefined metrics are stored as null.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return _json_safe(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(_json_safe(obj), indent=2, sort_keys=False) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    import torch  # here, not at the top: the dataset indexers and the report CLI start 2 s faster without it

    return _atomic(path, lambda p: torch.save(obj, p))


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e})") from e
