"""VisA indexer: parsing split_csv/1cls.csv into meta.json, and its error messages."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.meta import DatasetError, counts, validate_meta
from data.visa import build_meta, main
from utils.io import read_json

HEADER = "object,split,label,image,mask"
ROWS = [
    "candle,train,normal,candle/Data/Images/Normal/0001.JPG,",
    "candle,train,normal,candle/Data/Images/Normal/0000.JPG,",
    "candle,test,normal,candle/Data/Images/Normal/0002.JPG,",
    "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png",
    r"candle,test,anomaly,.\candle\Data\Images\Anomaly\001.JPG,./candle/Data/Masks/Anomaly/001.png",
    "pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,",
    "pcb1,test,anomaly,pcb1/Data/Images/Anomaly/000.JPG,pcb1/Data/Masks/Anomaly/000.png",
    "toy,train,normal,toy/0.png,",
    "toy,test,anomaly,toy/1.png,toy/1_mask.png",
]


def _write(root: Path, header: str = HEADER, rows=ROWS) -> Path:
    csv = root / "split_csv" / "1cls.csv"
    csv.parent.mkdir(parents=True, exist_ok=True)
    csv.write_text("\n".join([header, *rows]) + "\n")
    for row in rows:
        for col, rel in enumerate(row.split(",")[3:5]):
            if rel:
                path = root / rel.replace("\\", "/")
                path.parent.mkdir(parents=True, exist_ok=True)
                arr = np.zeros((6, 6), np.uint8)
                arr[2, 3] = 255 * col  # masks (second column) get a defect pixel; empty masks are refused
                Image.fromarray(arr).save(path, format="PNG")
    return csv


def test_parse_counts_and_schema(tmp_path):
    _write(tmp_path)
    meta = build_meta(tmp_path)
    validate_meta(meta, tmp_path)
    assert counts(meta) == {"train": {"candle": (2, 0), "pcb1": (1, 0)}, "test": {"candle": (1, 2), "pcb1": (0, 1)}}
    bad = meta["test"]["candle"][1]
    assert bad == {"img_path": "candle/Data/Images/Anomaly/001.JPG", "mask_path": "candle/Data/Masks/Anomaly/001.png",
                   "cls_name": "candle", "specie_name": "bad", "anomaly": 1}
    assert {it["specie_name"] for it in meta["train"]["candle"]} == {"good"}
    assert list(build_meta(tmp_path, ["toy"])["test"]) == ["toy"]  # non-VisA objects only on request


def test_only_unknown_objects_are_all_used(tmp_path):
    _write(tmp_path, rows=ROWS[-2:])
    assert list(build_meta(tmp_path)["train"]) == ["toy"]


def test_missing_csv_names_file_and_columns(tmp_path):
    with pytest.raises(DatasetError) as e:
        build_meta(tmp_path)
    assert str(tmp_path / "split_csv" / "1cls.csv") in str(e.value) and HEADER.replace(",", ", ") in str(e.value)


@pytest.mark.parametrize("header, word", [(HEADER + ",extra", "extra"), ("object,split,label,image", "mask")])
def test_wrong_columns(tmp_path, header, word):
    _write(tmp_path, header, rows=[r + ",x" if "extra" in header else r.rsplit(",", 1)[0] for r in ROWS[:2]])
    with pytest.raises(DatasetError, match=word):
        build_meta(tmp_path)


@pytest.mark.parametrize("row, needle", [
    ("candle,test,broken,candle/a.png,", "line 2"),
    ("candle,val,normal,candle/a.png,", "split"),
    ("candle,test,anomaly,candle/a.png,", "no mask"),
    ("candle,train,anomaly,candle/a.png,candle/m.png", "train"),
])
def test_bad_rows(tmp_path, row, needle):
    _write(tmp_path, rows=[row])
    with pytest.raises(DatasetError, match=needle):
        build_meta(tmp_path)


def test_missing_image_and_unknown_category(tmp_path):
    _write(tmp_path)
    (tmp_path / "pcb1" / "Data" / "Images" / "Normal" / "0000.JPG").unlink()
    with pytest.raises(DatasetError, match="0000.JPG"):
        build_meta(tmp_path, ["pcb1"])
    with pytest.raises(DatasetError, match="available"):
        build_meta(tmp_path, ["pcb9"])


def test_cli(tmp_path, capsys):
    _write(tmp_path)
    assert main(["--root", str(tmp_path), "--categories", "candle"]) == 0
    assert list(read_json(tmp_path / "meta.json")["test"]) == ["candle"]
    assert main(["--root", str(tmp_path / "nowhere")]) == 1
    assert str(tmp_path / "nowhere") in capsys.readouterr().err


def test_surplus_fields_and_malformed_csv_are_named(tmp_path):
    _write(tmp_path, rows=["candle,train,normal,candle/a.png,,surplus"])
    with pytest.raises(DatasetError, match=r"1cls.csv line 2: 6 fields, expected 5"):
        build_meta(tmp_path)
    csv = tmp_path / "split_csv" / "1cls.csv"
    csv.write_text(HEADER + "\ncandle,train,normal," + "x" * 200_000 + ",\n")  # over csv's field size limit
    with pytest.raises(DatasetError, match=r"1cls.csv line \d+: malformed CSV"):
        build_meta(tmp_path)


def test_paths_are_normalised_inside_the_root(tmp_path):
    _write(tmp_path, rows=["toy,train,normal,toy/./sub/../0.png,"])  # also creates toy/sub
    assert build_meta(tmp_path)["train"]["toy"][0]["img_path"] == "toy/0.png"
