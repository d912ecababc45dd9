"""Checks on the photos and the output folder of predict.py, made before any model is built.

- The output folder must be writable, and no input folder or glob may pick up what this run writes into
  it: a rerun would score its own overlays and masks as photos (or fit them as references). Refused,
  not worked around: an output folder inside the inputs is easy to move, and excluding files by name
  would also exclude a user's own photo called x_overlay.png.
- A query that is one of the references (the same file, or a copy with the same bytes) is not scored:
  matched against itself its score is about 0 by construction, not a measurement. It is listed among
  the skipped files with that reason.
- A reference given twice (two copies with the same bytes) is used once, saying so: a copy adds no
  information, and k would otherwise count it twice.
- A calibration photo (--calibrate) that is a reference or a query, or a copy of one, is refused: scored
  against itself a reference sets the threshold near 0, and a query would set the threshold it is judged by.
"""
from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
import sys
from pathlib import Path

from utils.io import OutputError, check_writable

# file names an earlier run leaves in its output folder (predict.py: <name>_overlay.png, <name>_mask.png)
OUTPUT_PROBES = ("photo_overlay.png", "photo_mask.png")


def _glob_match(pattern: list[str], parts: list[str]) -> bool:
    """Whether path parts match glob pattern parts as glob.glob(recursive=True) would: '**' spans any
    number of folders, other parts match one name (fnmatch, case-sensitive), hidden names only explicitly."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_glob_match(rest, parts[i:]) for i in range(len(parts) + 1)
                   if not any(p.startswith(".") for p in parts[:i]))
    if not parts or (parts[0].startswith(".") and not head.startswith(".")):
        return False
    return fnmatch.fnmatchcase(parts[0], head) and _glob_match(rest, parts[1:])


def _parts(path: str) -> list[str]:
    return list(Path(os.path.abspath(path)).parts)


def inputs_reaching(out: str | os.PathLike, specs: list[tuple[str, str]]) -> list[str]:
    """The inputs (option, spec) that would collect files this run writes into `out`: a folder that is
    `out` itself (a folder gives the photos directly in it), a glob matching a file in `out`."""
    out_paths = {os.path.abspath(out), os.path.realpath(out)}
    hits = []
    for option, spec in specs:
        if Path(spec).is_dir():
            if {os.path.abspath(spec), os.path.realpath(spec)} & out_paths:
                hits.append(f"{option} {spec}")
        elif not Path(spec).is_file() and glob.has_magic(spec):
            pattern = _parts(spec)
            if any(_glob_match(pattern, _parts(os.path.join(o, name))) for o in out_paths for name in OUTPUT_PROBES):
                hits.append(f"{option} {spec!r}")
    return hits


def check_output_folder(out: str | os.PathLike, refs: list[str], images: list[str],
                        calibrate: list[str] = ()) -> None:
    """Refuse, before any work, an --out that cannot be written or that an input would read back."""
    check_writable(out, "output folder (--out)")
    hits = inputs_reaching(out, [("--refs", s) for s in refs] + [("--images", s) for s in images]
                           + [("--calibrate", s) for s in calibrate])
    if hits:
        raise OutputError(f"--out {out} would be read back by {', '.join(hits)}: a rerun would take this run's "
                          f"overlays and masks for photos; choose an output folder outside the inputs")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _finder(paths: list[Path]):
    """A lookup: photo -> (the first of `paths` it is, or has the bytes of; "is" or "has the same bytes
    as"), else None. Only files of a size one of `paths` has are hashed, each once."""
    by_path = {p.resolve(): p for p in paths}
    by_size: dict[int, list[Path]] = {}
    for p in paths:
        by_size.setdefault(p.stat().st_size, []).append(p)
    digests: dict[Path, str] = {}

    def digest(p: Path) -> str:
        if p not in digests:
            digests[p] = _digest(p)
        return digests[p]

    def find(photo: Path) -> tuple[Path, str] | None:
        hit = by_path.get(photo.resolve())
        if hit is not None:
            return hit, "is"
        same_size = by_size.get(photo.stat().st_size, [])
        if same_size:
            d = digest(photo)
            hit = next((p for p in same_size if digest(p) == d), None)
            if hit is not None:
                return hit, "has the same bytes as"
        return None

    return find


def distinct_references(refs: list[Path]) -> list[Path]:
    """The references with copies (same bytes as an earlier one) left out, each named in a warning."""
    kept, seen = [], {}
    for p in refs:
        key = (p.stat().st_size, _digest(p))
        if key in seen:
            print(f"predict.py: warning: reference {p} has the same bytes as {seen[key]}; it is used once, so "
                  f"k counts distinct photos", file=sys.stderr)
            continue
        seen[key] = p
        kept.append(p)
    return kept


def split_off_references(queries: list[Path], refs: list[Path]) -> tuple[list[Path], list[dict]]:
    """(the queries to score, the skipped ones with their reason): a query that is a reference file, or
    has a reference's bytes, is not scored. Only files of a reference's size are hashed."""
    find = _finder(refs)
    kept, skipped = [], []
    for q in queries:
        found = find(q)
        if found is None:
            kept.append(q)
        else:
            ref, same = found
            skipped.append({"image": str(q), "reason": f"it {same} the reference {ref}: matched against itself its "
                                                       f"score would be about 0, not a measurement"})
    if not kept:
        raise ValueError(f"every query image is one of the references (first: {queries[0]}); score other photos "
                         f"than the normal references")
    return kept, skipped


def check_calibration_photos(photos: list[Path], refs: list[Path], queries: list[Path]) -> None:
    """Refuse a calibration photo that is a reference or a query (the same file, or the same bytes),
    naming both: calibration photos must be other normal photos."""
    for others, role, why in ((refs, "the reference", "scored against itself it would set the threshold near 0"),
                              (queries, "the query", "a photo cannot set the threshold it is judged by")):
        find = _finder(others)
        for c in photos:
            found = find(c)
            if found is not None:
                hit, same = found
                raise ValueError(f"--calibrate photo {c} {same} {role} {hit}: {why}; calibrate on other normal "
                                 f"photos than the references and the queries")
