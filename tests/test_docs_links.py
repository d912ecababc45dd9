"""Every relative link between the README and docs/ points at a file that exists, and every
'#anchor' at a heading of that file (GitHub's slug rule), so moving a section cannot leave a dead
link behind."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out, in_code = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(r"^#{1,6} ", line):
            slug = github_slug(line.lstrip("#"))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")  # GitHub numbers repeated headings
    return out


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return [m.group(1) for m in LINK.finditer(text)]


def test_slug_rule():
    assert github_slug(" Prediction (`predict.py`)") == "prediction-predictpy"
    assert github_slug("GPUs, mixed precision and several processes") == "gpus-mixed-precision-and-several-processes"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page: Path):
    dead = []
    for target in links(page):
        if re.match(r"^[a-z]+:", target):  # http:, mailto: ... are not checked (no network)
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            dead.append(f"{target} (no file {dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            dead.append(f"{target} (no heading '#{anchor}' in {dest.name})")
    assert not dead, f"{page.relative_to(ROOT)}: dead links: {dead}"


def test_every_doc_is_linked_from_the_readme():
    readme_targets = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    orphans = [str(p.relative_to(ROOT)) for p in PAGES[1:] if p.resolve() not in readme_targets]
    assert not orphans, f"docs not linked from the README: {orphans}"
