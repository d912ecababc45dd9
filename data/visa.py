"""Build meta.json for VisA from its one-class split file, split_csv/1cls.csv.

The CSV has the columns object,split,label,image,mask with label 'normal'/'anomaly',
split 'train'/'test', and paths relative to the dataset root (mask empty for normal).
VisA has no defect-type folders, so specie_name is 'good' or 'bad'.
"""
from __future__ import annotations

import csv
import io
import posixpath
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python data/visa.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.images import check_items  # noqa: E402
from data.meta import DatasetError, index_cli, leaves_root, make_item, sort_meta  # noqa: E402

VISA_CATEGORIES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)
SPLIT_CSV = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": 0, "anomaly": 1}


def _clean_path(value: str) -> str:
    # Some copies of the CSV carry Windows separators or a leading './'.
    value = value.strip().replace("\\", "/")
    while value.startswith("./"):
        value = value[2:]
    return posixpath.normpath(value) if value else value


def _read_text(csv_path: Path) -> str:
    """The CSV as text; anything but UTF-8 (a BOM is fine) is refused in one line naming the file."""
    data = csv_path.read_bytes()
    expected = "save it as UTF-8 (with or without a byte-order mark)"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DatasetError(f"{csv_path} is UTF-16 text, expected UTF-8; {expected}")
    if b"\x00" in data:  # UTF-16 without a byte-order mark: ASCII text with NULs in between
        raise DatasetError(f"{csv_path} contains NUL bytes (UTF-16 without a byte-order mark, or not text), "
                           f"expected UTF-8; {expected}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DatasetError(f"{csv_path} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}, "
                           f"e.g. Latin-1 or Windows-1252); {expected}") from e


def read_rows(csv_path: Path) -> list[tuple[int, dict]]:
    """(line number, row dict) for each row of 1cls.csv, with the header checked against COLUMNS."""
    expected = ", ".join(COLUMNS)
    if not csv_path.is_file():
        raise DatasetError(f"VisA split file not found: {csv_path} (expected a CSV with columns {expected})")
    reader = csv.DictReader(io.StringIO(_read_text(csv_path), newline=""))
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in COLUMNS if c not in header]
        unknown = [c for c in header if c not in COLUMNS]
        if missing or unknown:
            raise DatasetError(f"{csv_path}: columns must be {expected}; "
                               f"missing {missing or 'none'}, unknown {unknown or 'none'}")
        reader.fieldnames = header
        rows = []
        for row in reader:
            if None in row:  # DictReader files surplus fields under the key None
                raise DatasetError(f"{csv_path} line {reader.line_num}: {len(COLUMNS) + len(row[None])} fields, "
                                   f"expected {len(COLUMNS)} ({expected})")
            rows.append((reader.line_num, {k: (v or "").strip() for k, v in row.items()}))
        return rows
    except csv.Error as e:
        raise DatasetError(f"{csv_path} line {reader.line_num}: malformed CSV ({e})") from e


def _row_item(root: Path, row: dict, line: int, csv_path: Path) -> tuple[str, dict]:
    where = f"{csv_path} line {line}"
    if row["split"] not in ("train", "test"):
        raise DatasetError(f"{where}: split must be 'train' or 'test', got {row['split']!r}")
    if row["label"] not in LABELS:
        raise DatasetError(f"{where}: label must be 'normal' or 'anomaly', got {row['label']!r}")
    anomaly = LABELS[row["label"]]
    if anomaly and row["split"] == "train":
        raise DatasetError(f"{where}: anomalous image in the train split ({row['image']})")
    img = _clean_path(row["image"])
    mask = _clean_path(row["mask"]) if anomaly else ""
    if anomaly and not mask:
        raise DatasetError(f"{where}: anomalous image {img} has no mask path")
    for column, path in (("image", img), ("mask", mask)):
        if path and leaves_root(path):
            raise DatasetError(f"{where}: {column} path {row[column]!r} leaves the dataset root {root}; "
                               f"paths must be relative to it and stay inside")
    for path in (img, mask):
        if path and not (root / path).is_file():
            raise DatasetError(f"{where}: file not found: {root / path}")
    return row["split"], make_item(img, mask, row["object"], "bad" if anomaly else "good", anomaly)


def build_meta(root: str | Path, categories: list[str] | None = None, allow_empty_masks: bool = False) -> dict:
    """meta.json content for VisA; default categories: the 12 official ones present, else all.
    Images and masks are checked as in data/mvtec.py (readable, same size, masks not empty)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root not found: {root} (expected the VisA root holding {SPLIT_CSV})")
    csv_path = root / SPLIT_CSV
    rows = read_rows(csv_path)
    present = sorted({r["object"] for _, r in rows})
    if categories:
        unknown = [c for c in categories if c not in present]
        if unknown:
            raise DatasetError(f"category {unknown[0]!r} not in {csv_path}; available: {', '.join(present)}")
        wanted = set(categories)
    else:
        wanted = set(VISA_CATEGORIES) & set(present) or set(present)
    meta: dict = {"train": {c: [] for c in sorted(wanted)}, "test": {c: [] for c in sorted(wanted)}}
    first_line: dict[tuple[str, str], int] = {}
    for line, row in rows:
        if row["object"] in wanted:
            split, item = _row_item(root, row, line, csv_path)
            key = (row["object"], item["img_path"])
            if key in first_line:  # scored twice, or a reference scored against itself (data/meta.py)
                raise DatasetError(f"{csv_path} lines {first_line[key]} and {line}: image {item['img_path']} of "
                                   f"{row['object']} is listed twice; list each image once, in one split")
            first_line[key] = line
            meta[split][row["object"]].append(item)
    meta = sort_meta(meta)
    check_items(root, meta, allow_empty_masks)
    return meta


def main(argv: list[str] | None = None) -> int:
    return index_cli(
        build_meta,
        f"Write <root>/meta.json for VisA from <root>/{SPLIT_CSV.as_posix()} "
        f"(columns {', '.join(COLUMNS)}).",
        "Without --categories, the 12 VisA categories found in the CSV are used; "
        "if none is present, every object named in the CSV is used. The CSV must be UTF-8 and its paths "
        "must stay inside the root; every image must be readable, each mask must have its image's size "
        "and at least one non-zero (defect) pixel.",
        argv)


if __name__ == "__main__":
    sys.exit(main())
