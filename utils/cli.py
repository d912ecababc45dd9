"""What every entry point does around its work: logging set-up, and user errors as one line."""
from __future__ import annotations

import logging
import sys
from typing import Callable


def run_cli(prog: str, work: Callable[[], object]) -> int:
    """Run `work`; a missing file or a bad value (every backbone error included) is printed as
    `prog: error: ...` with exit code 2 instead of a traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("fdsl").setLevel(logging.INFO)
    try:
        work()
    except (FileNotFoundError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0
