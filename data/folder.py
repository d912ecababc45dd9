"""Index a flat folder of your own photos as a one-category dataset (<root>/meta.json).

Layout under --root (any image format Pillow reads, any extension; subfolders are indexed too, e.g.
good/day1/ and good/day2/; hidden files and folders such as .ipynb_checkpoints/ are not):

    good/          normal photos
    bad/           defective photos
    masks/         optional: the defect mask of each bad photo, same stem and the same subfolder (bad/x.jpg ->
                   masks/x.png, bad/dent/y.jpg -> masks/dent/y.png, or masks/y.png when no other bad photo is
                   called y; masks/x_mask.png is accepted too), non-zero = defect, the photo's size
    train/good/    optional: normal photos used as references only

Which photos are train references (the pool k-shot sampling draws from), first rule that applies:

    --train-from DIR   every image in DIR (a folder inside --root); the test split keeps the rest of good/
    train/good/        when present
    --train-good N     the first N photos of good/ by path (default 4), MOVED out of the test
                       split so no reference is ever scored against itself

The first N by path, not a random draw: the choice is visible in the file list and stable when photos
are added. k-shot sampling then draws its k references at random from this pool (seeded).

A bad photo without a mask stops the indexer (pixel metrics need every mask); --allow-missing-masks
indexes it with mask_path '' and marks the file with "missing_masks": true at the top level. test.py
then computes the image metrics over all photos and the pixel metrics over the photos with a mask
(metrics.json records how many); train.py refuses such a dataset.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python data/folder.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.images import check_items  # noqa: E402
from data.meta import (META_NAME, MISSING_MASKS_KEY, DatasetError, image_extensions, make_item,  # noqa: E402
                       rel_posix, shown, sort_meta, summarise, unread_photos, validate_meta)
from utils.io import atomic_write_json  # noqa: E402

DEFAULT_TRAIN_GOOD = 4


def is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in image_extensions()


def _warn_skipped(folder: Path, others: list[str], subfolders: list[str] = ()) -> None:
    unread = unread_photos(others)
    if unread:
        print(f"warning: {folder}: {len(unread)} photo(s) skipped, a format Pillow does not open here: "
              f"{shown(unread)}", file=sys.stderr)
    if subfolders:
        print(f"warning: {folder}: subfolder(s) not searched: {shown(subfolders)} (name their photos, or a glob "
              f"such as '{folder}/**/*')", file=sys.stderr)


def list_image_files(folder: Path) -> list[Path]:
    """Images directly inside folder, sorted by name; hidden files skipped. Other files and the subfolders
    that hold images are named in a warning (predict.py: a folder means the photos in it)."""
    entries = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    found = [p for p in entries if is_image_file(p)]
    others = [p.name for p in entries if p.is_file() and not is_image_file(p)]
    subfolders = [f"{p.name}/" for p in entries if p.is_dir() and any(map(is_image_file, _files_under(p)))]
    _warn_skipped(folder, others, subfolders)
    return found


def _files_under(folder: Path):
    """Every non-hidden file under folder, hidden folders (.ipynb_checkpoints/) skipped; a linked folder is
    followed once (a link back up does not loop)."""
    seen = set()
    for top, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield from (Path(top) / n for n in sorted(names) if not n.startswith("."))


def walk_images(folder: Path) -> tuple[list[Path], list[str]]:
    """(images anywhere under folder sorted by their path below it, the other files' relative paths)."""
    images, others = [], []
    for p in _files_under(folder):
        (images if is_image_file(p) else others).append(p)
    key = lambda p: p.relative_to(folder).as_posix()  # noqa: E731
    return sorted(images, key=key), sorted(key(p) for p in others)


def _images_in(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(f"{what} folder not found: {folder}")
    found, others = walk_images(folder)
    _warn_skipped(folder, others)
    if not found:
        raise DatasetError(f"no image in {folder} ({what}); expected files such as .png or .jpg")
    return found


def find_masks(bad: list[Path], mask_dir: Path, bad_dir: Path | None = None) -> tuple[dict[Path, Path], list[Path]]:
    """{bad image: its mask} and the bad images without one. A mask matches by stem (x) or, failing that,
    by stem + '_mask', in the folder of masks/ that mirrors the photo's subfolder of bad/ (bad_dir), then
    directly in masks/ when no other bad photo has that stem; two files of one stem (x.png and x.tif) are
    ambiguous and refused."""
    masks = walk_images(mask_dir)[0] if mask_dir.is_dir() else []
    by_stem: dict[tuple[str, str], list[Path]] = {}
    for m in masks:
        by_stem.setdefault((m.parent.relative_to(mask_dir).as_posix(), m.stem), []).append(m)
    stems: dict[str, int] = {}
    for img in bad:
        stems[img.stem] = stems.get(img.stem, 0) + 1
    found, missing, used = {}, [], set()
    for img in bad:
        sub = img.parent.relative_to(bad_dir).as_posix() if bad_dir is not None else "."
        places = [sub] + (["."] if sub != "." and stems[img.stem] == 1 else [])
        for key in ((place, stem) for place in places for stem in (img.stem, f"{img.stem}_mask")):
            hits = by_stem.get(key, [])
            if len(hits) > 1:
                raise DatasetError(f"ambiguous masks for {img}: {', '.join(str(h) for h in hits)}; keep one")
            if hits:
                found[img] = hits[0]
                used.add(hits[0])
                break
        else:
            missing.append(img)
    orphans = [m.relative_to(mask_dir).as_posix() for m in masks if m not in used]
    if orphans:  # likely a naming mistake; the bad image it belongs to would otherwise look unmasked
        print(f"warning: {len(orphans)} mask(s) in {mask_dir} match no image in bad/: {shown(orphans)}",
              file=sys.stderr)
    return found, missing


def _check_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise DatasetError(f"category name {name!r} must be a plain folder-like name (no slashes)")
    return name


def _train_split(root: Path, good: list[Path], train_good: int | None,
                 train_from: Path | None) -> tuple[list[Path], list[Path], str]:
    """(train images, normal test images, the rule that chose them, in words)."""
    if train_from is not None:
        folder = (train_from if train_from.is_absolute() else Path.cwd() / train_from).resolve()
        if not folder.is_relative_to(root.resolve()):
            raise DatasetError(f"--train-from {train_from} must be a folder inside --root {root}: meta.json "
                               f"paths are relative to the root")
        if folder == (root / "good").resolve():
            raise DatasetError(f"--train-from {train_from} is good/ itself: the test split would have no normal "
                               f"photo; use --train-good N to move some of them")
        train = [root / p.relative_to(root.resolve()) for p in _images_in(folder, "--train-from")]
        # a folder inside good/ (good/refs/): its photos are references, so they leave the test split
        chosen = {p.resolve() for p in train}
        return train, [p for p in good if p.resolve() not in chosen], f"every image of {train_from}"
    own = root / "train" / "good"
    if own.is_dir():
        if train_good is not None:
            raise DatasetError(f"{own} exists and --train-good {train_good} was given; use one of them (remove "
                               f"the option to use the folder)")
        return _images_in(own, "train/good"), good, "train/good/"
    n = DEFAULT_TRAIN_GOOD if train_good is None else train_good
    if n < 1:
        raise DatasetError(f"--train-good must be >= 1, got {n}")
    if n >= len(good):
        raise DatasetError(f"--train-good {n} would leave no normal test photo: good/ holds {len(good)}; use a "
                           f"smaller N, add photos or put references in train/good/")
    return good[:n], good[n:], f"the first {n} of good/ by path, moved out of the test split"


def build_meta(root: str | Path, name: str | None = None, train_good: int | None = None,
               train_from: str | Path | None = None, allow_missing_masks: bool = False,
               allow_empty_masks: bool = False) -> tuple[dict, str]:
    """(meta.json content, how the train split was chosen). Raises DatasetError (one line)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root not found: {root} (expected a folder holding good/ and bad/)")
    if train_good is not None and train_from is not None:
        raise DatasetError("--train-good and --train-from exclude each other")
    cls = _check_name(name or root.resolve().name)
    good, bad = _images_in(root / "good", "good"), _images_in(root / "bad", "bad")
    train, test_good, rule = _train_split(root, good, train_good,
                                          Path(train_from) if train_from is not None else None)
    masks, missing = find_masks(bad, root / "masks", root / "bad")
    if missing and not allow_missing_masks:
        names = [p.relative_to(root / "bad").as_posix() for p in missing]
        raise DatasetError(f"{len(missing)} photo(s) in bad/ have no mask in {root / 'masks'}: {shown(names)}; "
                           f"add masks (same stem) or pass --allow-missing-masks (pixel metrics then leave those "
                           f"photos out)")

    def item(img: Path, mask: Path | None, specie: str, anomaly: int) -> dict:
        return make_item(rel_posix(img, root), rel_posix(mask, root) if mask else "", cls, specie, anomaly)

    meta = sort_meta({"train": {cls: [item(p, None, "good", 0) for p in train]},
                      "test": {cls: [item(p, None, "good", 0) for p in test_good]
                               + [item(p, masks.get(p), "bad", 1) for p in bad]}})
    check_items(root, meta, allow_empty_masks)  # readable images, masks of their image's size
    if missing:
        meta[MISSING_MASKS_KEY] = True
    validate_folder_meta(meta)
    return meta, rule


def validate_folder_meta(meta: dict) -> None:
    """validate_meta: a meta marked missing_masks may hold anomalous test items with mask_path ''."""
    validate_meta(meta)


def write_meta(root: str | Path, meta: dict) -> Path:
    validate_folder_meta(meta)
    return atomic_write_json(Path(root) / META_NAME, meta)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, type=Path, help="folder holding good/ and bad/ (and masks/)")
    p.add_argument("--name", default=None, help="category name (default: the root folder's name)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--train-good", type=int, default=None, metavar="N",
                       help=f"move the first N photos of good/ to the train split (default {DEFAULT_TRAIN_GOOD} "
                            f"when there is no train/good/ folder)")
    group.add_argument("--train-from", type=Path, default=None, metavar="DIR",
                       help="use every image of DIR (inside --root) as train references")
    p.add_argument("--allow-missing-masks", action="store_true",
                   help="index bad photos without a mask (mask_path '', meta marked missing_masks)")
    p.add_argument("--allow-empty-masks", action="store_true",
                   help="index bad photos whose mask has no non-zero pixel")
    a = p.parse_args(argv)
    try:
        meta, rule = build_meta(a.root, a.name, a.train_good, a.train_from, a.allow_missing_masks,
                                a.allow_empty_masks)
        path = write_meta(a.root, meta)
    except (DatasetError, OSError) as e:  # OSError: unreadable folders, meta.json not writable
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # meta.json is written atomically: nothing half-written is left
        print("\ninterrupted (Ctrl-C); no half-written file was left", file=sys.stderr)
        return 130
    print(summarise(meta))
    print(f"train references: {rule}")
    if meta.get(MISSING_MASKS_KEY):
        n = sum(1 for items in meta["test"].values() for it in items if it["anomaly"] and not it["mask_path"])
        print(f"warning: {n} bad photo(s) indexed without a mask (\"{MISSING_MASKS_KEY}\": true)", file=sys.stderr)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
