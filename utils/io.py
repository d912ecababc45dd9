"""Atomic file writes: a crash, a full disk or Ctrl-C never leaves a half-written result behind, nor a
temporary file next to it."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable


@contextlib.contextmanager
def deferred_interrupt():
    """Ctrl-C (SIGINT) during the block takes effect when the block ends, so a write that has started
    finishes and cleans up first; a second Ctrl-C meanwhile takes effect at once. Only the main thread
    receives signals, so elsewhere this does nothing; so does a SIGINT that is ignored (a background job)
    or handled outside Python."""
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if not callable(previous):  # None, SIG_IGN, SIG_DFL: nothing Python-level to postpone
        yield
        return
    pending = []

    def later(signum, frame):
        if pending:  # asked twice: the user means it
            signal.signal(signal.SIGINT, previous)
            previous(signum, frame)
            return
        pending.append(signum)

    signal.signal(signal.SIGINT, later)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is later:
            signal.signal(signal.SIGINT, previous)
    if pending:
        previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt here


def _write_failed(path: Path, e: BaseException) -> OutputError:
    """A failed write as one line naming the file and the cause (a full disk, a quota, an I/O error)."""
    if isinstance(e, OSError):
        cause = e.strerror or str(e) or type(e).__name__
    else:  # torch's zip writer reports a full disk as a RuntimeError without errno: say how much space is left
        cause = " ".join(str(e).split()[-6:]) or type(e).__name__
        try:
            cause += f" ({shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free on its disk)"
        except OSError:
            pass
    return OutputError(f"cannot write {path}: {cause}; the previous version of the file, if any, is unchanged")


def _atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    path = Path(path)
    with deferred_interrupt():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except (PermissionError, FileNotFoundError, NotADirectoryError) as e:
            # name the file the caller asked for, not the hidden temporary one
            e.filename = str(path)
            raise
        except OSError as e:  # no space (inodes) or another I/O error
            raise _write_failed(path, e) from e
        try:
            os.close(fd)
            write(Path(tmp))
            os.replace(tmp, path)  # atomic on POSIX and Windows
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            if (isinstance(e, OSError) and not isinstance(e, OutputError)) or _torch_write_error(e):
                raise _write_failed(path, e) from e
            raise
    return path


def _torch_write_error(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and ("PytorchStreamWriter" in str(e) or "file write failed" in str(e))


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


class DuplicateKeyError(ValueError):
    """A JSON object names one key twice; json.loads would silently keep the last value."""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """object_pairs_hook for json.loads: refuse a key given twice (meta.json with a category twice would
    otherwise lose the first list without a word)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=unique_keys)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e})") from e
    except DuplicateKeyError as e:
        raise ValueError(f"{what} {path}: {e}; keep one") from e
