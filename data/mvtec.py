"""Build meta.json for a dataset in the MVTec AD folder layout.

Layout: <cls>/train/good/*.png, <cls>/test/<defect>/*.png (with test/good for normal
images) and <cls>/ground_truth/<defect>/NNN_mask.png for each anomalous NNN.png.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python data/mvtec.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.images import check_items  # noqa: E402
from data.meta import DatasetError, index_cli, is_image, list_images, make_item, rel_posix  # noqa: E402

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
LAYOUT_HINT = "<category>/train/good/ and <category>/test/<defect>/ folders"


def has_mvtec_layout(folder: Path) -> bool:
    return (folder / "train" / "good").is_dir() and (folder / "test").is_dir()


def find_categories(root: Path, categories: list[str] | None = None) -> list[str]:
    """Requested categories, else the official ones present, else every folder with the layout."""
    if categories:
        missing = [c for c in categories if not has_mvtec_layout(root / c)]
        if missing:
            raise DatasetError(f"category {missing[0]!r} not found under {root}: expected {root / missing[0]}"
                               f" with train/good/ and test/ folders")
        return list(categories)
    official = [c for c in MVTEC_CATEGORIES if has_mvtec_layout(root / c)]
    if official:
        return official
    # No official names: a synthetic or user dataset in the same layout.
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and has_mvtec_layout(p))
    if not found:
        raise DatasetError(f"no category folders found under {root}: expected {LAYOUT_HINT}")
    return found


def _mask_for(root: Path, cls: str, defect: str, img: Path) -> Path:
    folder = root / cls / "ground_truth" / defect
    candidates = [folder / f"{img.stem}_mask{img.suffix}"] + [
        p for p in (sorted(folder.glob(f"{img.stem}_mask.*")) if folder.is_dir() else []) if is_image(p)]
    for mask in candidates:
        if mask.is_file():
            return mask
    raise DatasetError(f"missing mask for anomalous image {img}: expected {folder / (img.stem + '_mask.png')}")


def _category_items(root: Path, cls: str) -> tuple[list[dict], list[dict]]:
    train = [make_item(rel_posix(p, root), "", cls, "good", 0)
             for p in list_images(root / cls / "train" / "good")]
    test = []
    for defect_dir in sorted((p for p in (root / cls / "test").iterdir() if p.is_dir()), key=lambda p: p.name):
        defect = defect_dir.name
        for img in list_images(defect_dir):
            if defect == "good":
                test.append(make_item(rel_posix(img, root), "", cls, "good", 0))
            else:
                mask = _mask_for(root, cls, defect, img)
                test.append(make_item(rel_posix(img, root), rel_posix(mask, root), cls, defect, 1))
    return train, test


def build_meta(root: str | Path, categories: list[str] | None = None, allow_empty_masks: bool = False) -> dict:
    """meta.json content for an MVTec-layout dataset; raises DatasetError on layout problems, unreadable
    images, masks of another size than their image and (unless allowed) empty masks."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root not found: {root} (expected a folder holding {LAYOUT_HINT})")
    meta: dict = {"train": {}, "test": {}}
    for cls in find_categories(root, categories):
        meta["train"][cls], meta["test"][cls] = _category_items(root, cls)
    check_items(root, meta, allow_empty_masks)
    return meta


def main(argv: list[str] | None = None) -> int:
    return index_cli(
        build_meta,
        "Write <root>/meta.json for a dataset in the MVTec AD layout "
        "(<cls>/train/good, <cls>/test/<defect>, <cls>/ground_truth/<defect>/NNN_mask.png).",
        "Without --categories, the official MVTec AD categories found under the root are used; "
        "if none is present, every folder with the MVTec layout (train/good and test) is used, "
        "so this also indexes the synthetic datasets of data/synthetic.py and your own data. "
        "Every image must be readable, each mask must have its image's size and at least one non-zero "
        "(defect) pixel.",
        argv)


if __name__ == "__main__":
    sys.exit(main())
