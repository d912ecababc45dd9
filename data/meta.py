"""Shared helpers for meta.json, the index every dataset script produces.

Schema: {"train": {cls: [item, ...]}, "test": {cls: [item, ...]}} where an item is
{"img_path", "mask_path", "cls_name", "specie_name", "anomaly"}; paths are relative to
the dataset root with forward slashes, and mask_path is '' for normal images.

Optional top-level key "missing_masks" (a bool): when true, anomalous test items may have
mask_path '' (photos whose defect was not outlined; data/folder.py --allow-missing-masks). They
count in the image metrics; test.py computes the pixel metrics over the masked images only.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path, PurePosixPath

from utils.io import atomic_write_json

META_NAME = "meta.json"
SPLITS = ("train", "test")
ITEM_KEYS = ("img_path", "mask_path", "cls_name", "specie_name", "anomaly")
MISSING_MASKS_KEY = "missing_masks"


class DatasetError(ValueError):
    """A dataset on disk does not match the layout a script expects; the message is one line."""


@functools.cache
def image_extensions() -> frozenset[str]:
    """Every file extension Pillow can open (.png, .jpg, .tif, .webp, ...): not the save-only ones such as
    .pdf, nor the stub formats (.h5, .grib, .wmf) that need a handler this install does not have, nor
    MPEG (Pillow reads its header only)."""
    from PIL import Image, ImageFile

    Image.init()  # registers all plugins, so the list does not depend on what was imported before

    def stub(fmt: str) -> bool:
        factory = Image.OPEN[fmt][0]
        return fmt == "MPEG" or (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))

    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN and not stub(fmt))


def is_image(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.suffix.lower() in image_extensions() and not p.name.startswith(".")


# Photo formats that a folder of images may hold but this Pillow may not read (phones: HEIC; cameras: raw
# files): skipped by the listings, named in a warning. Other files (notes.txt) are skipped silently.
PHOTO_EXTS = frozenset({".heic", ".heif", ".avif", ".jxl", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2",
                        ".raf", ".raw", ".exr", ".hdr", ".svg"})


def unread_photos(paths) -> list[str]:
    """The names among `paths` that look like photos in a format this Pillow does not open."""
    return [Path(p).as_posix() for p in paths
            if Path(p).suffix.lower() in PHOTO_EXTS and Path(p).suffix.lower() not in image_extensions()]


def shown(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name (hidden files skipped). Photos in a format this
    Pillow cannot open (.heic, camera raw) and subfolders holding images (the layout has none) are named in
    a warning, so none is left out unseen."""
    entries = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    files = [p for p in entries if p.is_file()]
    unread = unread_photos(p.name for p in files)
    if unread:
        print(f"warning: {folder}: {len(unread)} photo(s) skipped, a format Pillow does not open here: "
              f"{shown(unread)}", file=sys.stderr)
    nested = [f"{p.name}/" for p in entries if p.is_dir() and any(is_image(q) for q in p.rglob("*"))]
    if nested:
        print(f"warning: {folder}: subfolder(s) with images not indexed: {shown(nested)}", file=sys.stderr)
    return [p for p in files if is_image(p)]


def rel_posix(path: Path, root: Path) -> str:
    # Forward slashes keep meta.json identical across operating systems.
    return path.relative_to(root).as_posix()


def make_item(img_path: str, mask_path: str, cls_name: str, specie_name: str, anomaly: int) -> dict:
    return {"img_path": img_path, "mask_path": mask_path, "cls_name": cls_name,
            "specie_name": specie_name, "anomaly": int(anomaly)}


def sort_meta(meta: dict) -> dict:
    """Classes by name, items by image path, so the file is reproducible byte for byte; a
    "missing_masks" flag is kept."""
    out = {split: {cls: sorted(meta.get(split, {})[cls], key=lambda it: it["img_path"])
                   for cls in sorted(meta.get(split, {}))}
           for split in SPLITS}
    if MISSING_MASKS_KEY in meta:
        out[MISSING_MASKS_KEY] = meta[MISSING_MASKS_KEY]
    return out


def has_missing_masks(meta: dict) -> bool:
    """True when the meta is flagged "missing_masks" (anomalous test items may lack a mask)."""
    return meta.get(MISSING_MASKS_KEY) is True


def missing_mask_items(meta: dict, split: str = "test", classes=None) -> list[dict]:
    """Anomalous items of `split` (of `classes`, default all) that have no mask_path."""
    per_cls = meta.get(split, {})
    return [it for cls in (per_cls if classes is None else classes) for it in per_cls.get(cls, [])
            if it["anomaly"] and not it["mask_path"]]


def _is_rel_posix(value: object) -> bool:
    # Absolute paths or backslashes would tie meta.json to one machine or OS.
    return (isinstance(value, str) and "\\" not in value and not value.startswith("/")
            and not (len(value) > 1 and value[1] == ":"))


def leaves_root(rel: str) -> bool:
    """True when a relative path would point outside the dataset root: absolute, a drive, or more '..'
    than folders above it. Lexical on purpose: symlinks inside the root are followed, since a dataset
    root may legitimately link to folders stored elsewhere."""
    p = PurePosixPath(rel)
    if p.is_absolute() or (len(rel) > 1 and rel[1] == ":"):
        return True
    depth = 0
    for part in p.parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            return True
    return False


def _check_item(item: object, split: str, cls: str, missing_masks: bool = False) -> str | None:
    if not isinstance(item, dict) or set(item) != set(ITEM_KEYS):
        return f"{split}/{cls}: item must have exactly the keys {', '.join(ITEM_KEYS)}: {item!r}"
    where = f"{split}/{cls}: {item['img_path']!r}"
    if item["cls_name"] != cls:
        return f"{where}: cls_name {item['cls_name']!r} differs from its class key"
    if item["anomaly"] not in (0, 1) or isinstance(item["anomaly"], bool):
        return f"{where}: anomaly must be 0 or 1, got {item['anomaly']!r}"
    for key in ("img_path", "mask_path"):
        value = item[key]
        if not _is_rel_posix(value):
            return f"{where}: {key} must be a relative path with forward slashes, got {value!r}"
        if leaves_root(value):
            return f"{where}: {key} {value!r} leaves the dataset root; paths must stay inside it"
    if not item["img_path"]:
        return f"{split}/{cls}: empty img_path"
    if bool(item["anomaly"]) != bool(item["mask_path"]) and not (missing_masks and split == "test"):
        return f"{where}: anomalous items need a mask_path and normal items must have ''"
    if item["mask_path"] and not item["anomaly"]:
        return f"{where}: normal items must have mask_path ''"
    if split == "train" and item["anomaly"]:
        return f"{where}: the train split must hold normal images only"
    return None


def validate_meta(meta: dict, root: str | os.PathLike | None = None) -> None:
    """Raise DatasetError on the first schema violation; with `root`, also check files exist."""
    if not isinstance(meta, dict) or not set(SPLITS) <= set(meta) <= {*SPLITS, MISSING_MASKS_KEY}:
        raise DatasetError(f"meta must have exactly the keys {SPLITS} (and optionally "
                           f"{MISSING_MASKS_KEY!r}), got {list(meta)[:5]!r}")
    flag = meta.get(MISSING_MASKS_KEY, False)
    if not isinstance(flag, bool):
        raise DatasetError(f"{MISSING_MASKS_KEY} must be true or false, got {flag!r}")
    for split in SPLITS:
        if not isinstance(meta[split], dict):
            raise DatasetError(f"{split}: expected an object of categories")
        for cls, items in meta[split].items():
            if not isinstance(items, list):
                raise DatasetError(f"{split}/{cls}: expected a list of items")
            for item in items:
                problem = _check_item(item, split, cls, flag)
                if problem:
                    raise DatasetError(problem)
    problem = duplicate_problem(meta)
    if problem:
        raise DatasetError(problem)
    for split in SPLITS:
        for cls, items in meta[split].items():
            for item in items:
                for key in ("img_path", "mask_path") if root is not None else ():
                    if item[key] and not (Path(root) / item[key]).is_file():
                        raise DatasetError(f"{split}/{cls}: file not found: {Path(root) / item[key]}")


def duplicate_problem(meta: dict) -> str | None:
    """Why a category lists an image twice, or None. A test image listed twice would be scored twice; a
    train image listed twice could be drawn as two of one shot's references; an image in both splits
    could be drawn as a reference and then scored against itself. Refused rather than merged: the two
    entries may disagree (label, mask), and only the author of the index knows which one is right."""
    for cls in sorted(set(meta["train"]) | set(meta["test"])):
        seen: dict[str, str] = {}
        for split in SPLITS:
            for item in meta[split].get(cls, []):
                path = item["img_path"]
                key = PurePosixPath(path).as_posix()  # 'a/./b.png' and 'a/b.png' are one file
                if key in seen and seen[key] == split:
                    harm = "it would be scored twice" if split == "test" else \
                        "it could be drawn as two references of one shot"
                    return f"{split}/{cls}: {path!r} is listed twice; list each image once ({harm})"
                if key in seen:
                    return (f"{cls}: {path!r} is in both the train and the test split; a reference drawn from train "
                            f"would be scored against itself: keep it in one split")
                seen[key] = split
    return None


def counts(meta: dict) -> dict:
    """{split: {cls: (normal, anomalous)}}."""
    return {split: {cls: (sum(1 for it in items if not it["anomaly"]), sum(1 for it in items if it["anomaly"]))
                    for cls, items in sorted(meta.get(split, {}).items())}
            for split in SPLITS}


def summarise(meta: dict) -> str:
    """A small table: images per split and class, normal vs anomalous."""
    rows = [("split", "class", "normal", "anomalous", "total")]
    for split, per_cls in counts(meta).items():
        for cls, (n, a) in per_cls.items():
            rows.append((split, cls, str(n), str(a), str(n + a)))
        n_all = sum(n for n, _ in per_cls.values())
        a_all = sum(a for _, a in per_cls.values())
        rows.append((split, f"(all {len(per_cls)})", str(n_all), str(a_all), str(n_all + a_all)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def write_meta(root: str | os.PathLike, meta: dict) -> tuple[Path, str]:
    """Validate, sort and atomically write <root>/meta.json; returns (path, summary table)."""
    meta = sort_meta(meta)
    validate_meta(meta)
    path = atomic_write_json(Path(root) / META_NAME, meta)
    return path, summarise(meta)


def index_cli(build_meta, description: str, epilog: str, argv: list[str] | None = None) -> int:
    """Command line shared by the dataset indexers: --root [--categories] [--allow-empty-masks] -> meta.json.

    Errors are one line on stderr (exit 1) and leave any existing meta.json untouched."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=description, epilog=epilog)
    parser.add_argument("--root", required=True, type=Path, help="dataset root folder")
    parser.add_argument("--categories", nargs="+", metavar="CLS", help="categories to index (default: see below)")
    parser.add_argument("--allow-empty-masks", action="store_true",
                        help="index anomalous images whose mask has no non-zero pixel (they are named in a "
                             "warning); by default such images stop the indexer")
    args = parser.parse_args(argv)
    try:
        meta = build_meta(args.root, args.categories, allow_empty_masks=args.allow_empty_masks)
        path, summary = write_meta(args.root, meta)
    except (DatasetError, OSError) as e:  # OSError: unreadable folders, meta.json not writable
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # meta.json is written atomically: nothing half-written is left
        print("\ninterrupted (Ctrl-C); no half-written file was left", file=sys.stderr)
        return 130
    print(summary)
    print(f"wrote {path}")
    return 0
