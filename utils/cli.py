"""What every entry point does around its work: logging set-up, and user errors as one line."""
from __future__ import annotations

import logging
import re
import signal
import sys
import traceback
from typing import Callable

from utils.io import OutputError

# Bad input or an unusable environment: a missing file, a bad value (every dataset and backbone error
# included), a folder that cannot be written or is held by another run. Anything else is a bug and
# keeps its traceback.
USER_ERRORS = (FileNotFoundError, ValueError, PermissionError, OutputError)

_WORKER = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


def _unwrap_worker(e: BaseException) -> str:
    """The original message of an exception that PyTorch re-raised from a DataLoader worker.

    torch keeps the type but replaces the message with 'Caught X in DataLoader worker process N.'
    plus the worker's whole traceback; its last line is '<module.>X: <original message>'."""
    text = str(e)
    if not _WORKER.match(text):
        return text
    t = type(e)
    names = {t.__qualname__, f"{t.__module__}.{t.__qualname__}"}
    for line in reversed(text.rstrip("\n").splitlines()):
        name, sep, message = line.partition(": ")
        if sep and name in names:
            return message
    return text.splitlines()[0]


def user_error(e: BaseException) -> str | None:
    """The one-line message of an expected error, None for an unexpected one (a bug)."""
    return _unwrap_worker(e) if isinstance(e, USER_ERRORS) else None


def error_report(e: BaseException) -> str:
    """What a run's log file records about the exception that stopped it: the one-line message of a
    user error, or the type, message and traceback of anything else."""
    msg = user_error(e)
    if msg is not None:
        return f"error: {msg}"
    if isinstance(e, KeyboardInterrupt):
        return f"error: {'terminated (SIGTERM)' if isinstance(e, Terminated) else 'interrupted (KeyboardInterrupt)'}"
    return f"error: unexpected {type(e).__name__}: {e}\n" + "".join(traceback.format_exception(e)).rstrip("\n")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler or torchrun stopping the run), raised like Ctrl-C so that the same clean-up runs:
    temporary files removed, locks released, the run's log told."""


def _terminated(signum, frame):
    raise Terminated


INTERRUPTED = 130  # exit status of a run stopped by Ctrl-C, as a shell reports it (128 + SIGINT)


def run_cli(prog: str, work: Callable[[], object]) -> int:
    """Run `work`; a user error (USER_ERRORS, also when raised in a DataLoader worker) is printed as
    `prog: error: ...` with exit code 2 instead of a traceback, Ctrl-C as one line with exit code 130
    (SIGTERM: 143). Other exceptions propagate."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("fsad").setLevel(logging.INFO)  # the project's loggers: fsad.train, fsad.test, ...
    previous = None
    try:  # a SIGTERM that is ignored or handled already keeps its handler
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            previous = signal.signal(signal.SIGTERM, _terminated)
    except ValueError:  # not the main thread (tests calling main() from a worker thread)
        pass
    try:
        work()
    except USER_ERRORS as e:
        msg = user_error(e)
        if msg is None:
            raise
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted (Ctrl-C)"
        print(f"\n{prog}: {what}; no half-written or temporary file was left behind", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(e, Terminated) else INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0
