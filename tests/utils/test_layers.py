"""utils/ is the bottom layer: it may import the standard library, third-party packages and other
utils modules, never the packages built on it (models, methods, data) nor the entry scripts. An
import inside a function counts too: it is how the one cycle of the past (utils/distributed.py ->
models.backbones) hid."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ABOVE_UTILS = {"models", "methods", "data", "train", "test", "predict", "launch", "bench", "tests"}


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in `source`, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level > 1:  # from ..models import x: out of utils/
            found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


def upward_imports(source: str) -> list[tuple[int, str]]:
    return [(line, name) for line, name in imported_modules(source)
            if name.startswith("..") or name.split(".")[0] in ABOVE_UTILS]


def test_the_checker_sees_imports_at_any_depth():
    source = ("import os\nfrom utils.io import read_json\n"
              "def f():\n    from models.backbones import resolve_precision\n    import data.dataset\n"
              "class C:\n    def g(self):\n        import methods\n        from ..models import fdsl\n        from . import io\n")
    assert upward_imports(source) == [(4, "models.backbones"), (5, "data.dataset"), (8, "methods"), (9, "..models")]


def test_utils_imports_nothing_above_it():
    files = sorted((REPO / "utils").glob("*.py"))
    assert len(files) > 5
    bad = [f"utils/{f.name}:{line} imports {name}" for f in files
           for line, name in upward_imports(f.read_text(encoding="utf-8"))]
    assert not bad, "utils/ must not import models/, methods/, data/ or the scripts:\n" + "\n".join(bad)
