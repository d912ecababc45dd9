"""One run per output folder: a lock file naming its holder (pid, host, start time, command).

Two runs writing into one results or checkpoint folder would silently overwrite each other, so the
second one is refused with a message naming the folder and the holder. The lock file is held with
`fcntl.flock` while the run lives and removed when it ends (also on exceptions). A run killed
without clean-up (SIGKILL, power loss) leaves the file behind; its pid is then dead on this host,
and the next run takes the lock over and says so. A holder on another host cannot be checked from
here: it is respected, and the message says which file to delete if that run is gone.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from utils.io import OutputError

try:
    import fcntl
except ImportError:  # Windows: the pid check alone decides
    fcntl = None

LOCK_NAME = ".lock"
log = logging.getLogger("fsad.lock")


class RunLockedError(OutputError):
    """The folder is in use by another live run."""


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), None where unknown: tells a live
    holder from an unrelated process that got the same pid later."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # cannot be checked from here
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False  # our own pid without our flock: a dead run whose pid came back to us
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    ticks = holder.get("start_ticks")
    return ticks is None or _start_ticks(pid) in (None, ticks)


def describe(holder: dict | None) -> str:
    if not holder:
        return "holder not recorded yet"
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
            + (f": {holder['command']}" if holder.get("command") else ""))


def _read(fd: int) -> dict | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 65536).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class RunLock:
    """`with RunLock(folder, "results folder", hint):` holds `folder/.lock` for the block.

    Creates the folder (and its missing parents) and, when the block fails before anything else was
    written there, removes the folders it created, so a refused run leaves no empty folders behind."""

    def __init__(self, folder: str | os.PathLike, what: str = "output folder", hint: str = ""):
        self.folder, self.what, self.hint = Path(folder), what, hint
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None
        self.created: list[Path] = []

    def _mkdirs(self) -> None:
        missing = []
        p = self.folder.absolute()
        while not p.exists():
            missing.append(p)
            p = p.parent
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create the {self.what} {self.folder}: {e.strerror or e}") from None
        self.created = missing  # deepest first

    def acquire(self) -> "RunLock":
        self._mkdirs()
        try:
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    if self._try_take(fd):
                        self.fd = fd
                        return self
                except BaseException:
                    os.close(fd)
                    raise
                os.close(fd)  # the file was released and removed meanwhile: try again
        except OSError as e:
            if isinstance(e, OutputError):
                raise
            raise OutputError(f"cannot lock the {self.what} {self.folder}: {e.strerror or e}") from None
        finally:
            if self.fd is None:
                self._remove_created()

    def _try_take(self, fd: int) -> bool:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._refusal(_read(fd)) from None
        try:
            if os.stat(self.path).st_ino != os.fstat(fd).st_ino:
                return False
        except FileNotFoundError:
            return False
        holder = _read(fd)
        if holder is not None and _alive(holder):
            raise self._refusal(holder)
        if holder is not None:
            log.warning("taking over the lock of %s: its holder (%s) is no longer running", self.folder,
                        describe(holder))
        elif os.fstat(fd).st_size:
            log.warning("taking over the lock of %s: %s held no readable holder", self.folder, self.path)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "start_ticks": _start_ticks(os.getpid()), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
        data = json.dumps(me).encode("utf-8")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, data)
        return True

    def _refusal(self, holder: dict | None) -> RunLockedError:
        return RunLockedError(
            f"the {self.what} {self.folder} is in use by another run ({describe(holder)}); wait for it to "
            f"finish{', or ' + self.hint if self.hint else ''}. If that run is gone, delete {self.path}")

    def _remove_created(self) -> None:
        for p in self.created:  # deepest first; stops at the first folder something else wrote into
            try:
                p.rmdir()
            except OSError:
                break
        self.created = []

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)  # drops the flock
        self.fd = None
        self._remove_created()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
