"""Bad input, round two (issue 21): inputs that used to give a silently wrong number now give the right one or
a one-line refusal. EXIF orientation (images and masks, every format that carries it), an image listed twice,
category sets that differ between seeds, extensions and subfolders the indexers left out, predict.py scoring a
reference or reading its own output back. Numbers are compared with what the correct input gives."""
from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

import predict
from conftest import load_test_script
from data import folder as folder_indexer
from data import mvtec as mvtec_indexer
from data import visa as visa_indexer
from data.dataset import categories, load_meta, select_k_shot
from data.images import UPRIGHT, header_size, read_image, read_mask, transpose_array
from data.meta import DatasetError, validate_meta, write_meta
from data.photos import inputs_reaching
from utils import report
from utils.config import TestConfig

REPO = Path(__file__).resolve().parents[1]
W, H = 40, 24  # non-square: orientations 5-8 swap width and height
T = Image.Transpose
# the transpose that stores an upright picture so that EXIF orientation o shows it upright again
STORE = {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE, 6: T.ROTATE_90,
         7: T.TRANSVERSE, 8: T.ROTATE_270}


def exif(o: int) -> Image.Exif:
    e = Image.Exif()
    e[274] = o  # Orientation
    return e


def stored(upright: Image.Image, o: int) -> Image.Image:
    return upright if o == 1 else upright.transpose(STORE[o])


def rgb(seed: int = 0, w: int = W, h: int = H) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def insert_png_chunk(data: bytes, chunk: bytes, before: bytes) -> bytes:
    """The PNG with `chunk` placed before its first chunk of type `before` (IDAT or IEND)."""
    pos = 8
    while True:
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == before:
            return data[:pos] + chunk + data[pos:]
        pos += 12 + length


# --------------------------------------------------------------------------- #
# 1. EXIF orientation, applied on every read
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("method", sorted(UPRIGHT.values()))
def test_transpose_array_is_pillows_transpose(method):
    a = rgb(1, 5, 3)
    np.testing.assert_array_equal(transpose_array(a, method), np.asarray(Image.fromarray(a).transpose(method)))
    np.testing.assert_array_equal(transpose_array(a[..., 0], method),
                                  np.asarray(Image.fromarray(a[..., 0]).transpose(method)))


@pytest.mark.parametrize("fmt, ext, kw", [("JPEG", ".jpg", {"quality": 95}), ("PNG", ".png", {}),
                                          ("TIFF", ".tif", {}), ("WEBP", ".webp", {"lossless": True})])
@pytest.mark.parametrize("o", range(1, 9))
def test_every_orientation_reads_as_a_viewer_shows_it(tmp_path, fmt, ext, kw, o):
    """The reference is Pillow's own ImageOps.exif_transpose; sizes are the upright ones everywhere."""
    path = tmp_path / f"x{ext}"
    stored(Image.fromarray(rgb(o)), o).save(path, fmt, exif=exif(o), **kw)
    with Image.open(path) as im:
        shown = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    if fmt != "JPEG":
        np.testing.assert_array_equal(shown, rgb(o))  # the lossless files really hold the upright picture
    arr, wh = read_image(path, None)
    np.testing.assert_array_equal(np.round(arr * 255).astype(np.uint8), shown)
    assert wh == header_size(path) == (W, H)
    small, _ = read_image(path, 16)  # resized after turning: the same as resizing the upright picture
    expected = np.asarray(Image.fromarray(shown).resize((16, 16), Image.BICUBIC), dtype=np.float32) / 255
    np.testing.assert_array_equal(small, expected)


@pytest.mark.parametrize("fmt, ext", [("PNG", ".png"), ("TIFF", ".tif")])
@pytest.mark.parametrize("o", [3, 6, 7])
def test_masks_are_turned_like_their_images(tmp_path, fmt, ext, o):
    m = np.zeros((H, W), np.uint8)
    m[2:6, 3:12] = 255
    stored(Image.fromarray(m), o).save(tmp_path / f"m{ext}", fmt, exif=exif(o))
    defect, wh = read_mask(tmp_path / f"m{ext}", None)
    np.testing.assert_array_equal(defect, m > 0)
    assert wh == header_size(tmp_path / f"m{ext}", "mask") == (W, H)


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
def test_uncompressed_tiffs_that_pillow_maps_are_not_scrambled(tmp_path, mode):
    """Pillow 13 turns such TIFFs itself but scrambles the ones it memory-maps (opened by path)."""
    a = rgb(3)
    upright = {"L": a[..., 0], "RGBA": np.dstack([a, a[..., :1]]), "I;16": a[..., 0].astype(np.uint16) * 257}[mode]
    stored(Image.fromarray(upright), 6).save(tmp_path / "x.tif", exif=exif(6))
    arr, wh = read_image(tmp_path / "x.tif", None)
    grey = upright if upright.ndim == 2 else None
    if grey is not None:
        np.testing.assert_allclose(arr[..., 0], grey / (65535 if mode == "I;16" else 255), atol=1e-6)
    else:
        np.testing.assert_array_equal(np.round(arr * 255).astype(np.uint8), a)
    assert wh == (W, H)


def test_png_exif_after_the_pixels_and_in_imagemagick_text_is_read(tmp_path):
    up = Image.fromarray(rgb(4))
    buf = io.BytesIO()
    stored(up, 6).save(buf, "PNG")
    late = insert_png_chunk(buf.getvalue(), png_chunk(b"eXIf", exif(6).tobytes()), b"IEND")
    (tmp_path / "late.png").write_bytes(late)
    hexed = exif(8).tobytes().hex()
    text = png_chunk(b"tEXt", b"Raw profile type exif\0\nexif\n" + f"{len(hexed) // 2:8d}\n{hexed}\n".encode())
    buf = io.BytesIO()
    stored(up, 8).save(buf, "PNG")
    (tmp_path / "text.png").write_bytes(insert_png_chunk(buf.getvalue(), text, b"IEND"))
    for name in ("late.png", "text.png"):
        assert header_size(tmp_path / name) == (W, H), name  # found without decoding the pixels first
        arr, wh = read_image(tmp_path / name, None)
        np.testing.assert_array_equal(np.round(arr * 255).astype(np.uint8), rgb(4))
        assert wh == (W, H)


def test_16bit_colour_png_is_turned_too(tmp_path):
    """Decoded by OpenCV (which ignores the tag): the orientation is applied to its array."""
    up16 = rgb(5).astype(np.uint16) * 257
    ok, enc = cv2.imencode(".png", np.ascontiguousarray(np.rot90(up16, 1)[..., ::-1]))  # stored turned left
    data = insert_png_chunk(enc.tobytes(), png_chunk(b"eXIf", exif(6).tobytes()), b"IDAT")
    (tmp_path / "c16.png").write_bytes(data)
    arr, wh = read_image(tmp_path / "c16.png", None)
    np.testing.assert_allclose(arr, up16 / 65535, atol=1e-7)
    assert wh == header_size(tmp_path / "c16.png") == (W, H)


def test_unknown_or_broken_orientation_is_read_as_stored(tmp_path):
    for value in (0, 9, 300):
        Image.fromarray(rgb(6)).save(tmp_path / "x.jpg", exif=exif(value), quality=100, subsampling=0)
        arr, wh = read_image(tmp_path / "x.jpg", None)
        assert wh == (W, H) and np.abs(arr * 255 - rgb(6)).max() < 8


@pytest.fixture(scope="module")
def phone_photos(datasets, tmp_path_factory):
    """The target dataset's wood_board category (its grain has a direction) as phone photos: JPEGs stored
    sideways (orientations 1-8 in turn) with the EXIF tag, masks as PNGs with the tag too; and the upright
    copies: the same pixels as a viewer shows them (Pillow's exif_transpose), as plain PNGs. Non-square,
    so sizes must be turned too."""
    src, base = datasets[1], tmp_path_factory.mktemp("phone")
    upright_root, phone_root = base / "upright", base / "phone"
    images = sorted(p for p in (src / "wood_board").rglob("*.png") if "ground_truth" not in p.parts)
    for i, path in enumerate(images):
        o = i % 8 + 1  # a mask is stored turned like its photo, as a phone app would save both
        rel = path.relative_to(src)
        mask = src / "wood_board" / "ground_truth" / rel.parts[-2] / f"{path.stem}_mask.png"
        for root in (upright_root, phone_root):
            (root / rel.parent).mkdir(parents=True, exist_ok=True)
        with Image.open(path) as im:
            pic = im.convert("RGB").resize((96, 64), Image.BICUBIC)
        phone = (phone_root / rel).with_suffix(".jpg")
        stored(pic, o).save(phone, quality=90, exif=exif(o))
        with Image.open(phone) as im:
            ImageOps.exif_transpose(im).save(upright_root / rel)
        if mask.is_file():  # lossless: the upright copy is the mask itself
            mrel = mask.relative_to(src)
            with Image.open(mask) as im:
                m = im.resize((96, 64), Image.NEAREST)
            for root in (upright_root, phone_root):
                (root / mrel.parent).mkdir(parents=True, exist_ok=True)
            m.save(upright_root / mrel)
            stored(m, o).save(phone_root / mrel, exif=exif(o))
    for root in (upright_root, phone_root):
        write_meta(root, mvtec_indexer.build_meta(root))
    return upright_root, phone_root


def knn_run(data_root: Path, results: Path, **kw) -> dict:
    cfg = TestConfig(data_root=str(data_root), dataset="phone", results_root=str(results), model_name="knn",
                     method="knn", backbone="tiny_clip", k_shot=2, seed=0, **kw)
    run = load_test_script().evaluate(cfg)
    return json.loads((run / "metrics.json").read_text())


def test_phone_photos_score_as_their_upright_copies(phone_photos, tmp_path):
    upright, phone = phone_photos
    turned = [p for p in phone.rglob("*.jpg") if Image.open(p).getexif().get(274, 1) != 1]
    assert len(turned) >= 12  # stored turned or mirrored: reading them as stored scores other pictures
    a = knn_run(upright, tmp_path / "a", eval_size=32)
    b = knn_run(phone, tmp_path / "b", eval_size=32)
    for key, value in a["per_category"]["wood_board"].items():
        np.testing.assert_allclose(b["per_category"]["wood_board"][key], value, rtol=1e-6, atol=1e-7, err_msg=key)
    assert a["per_category"]["wood_board"]["i_auroc"] > 0.5
    # read as stored (the bug), the grain of the turned photos runs the other way: p-AUPRO 0.875 -> 0.724


def test_eval_size_0_takes_the_upright_size(phone_photos):
    """test.py --eval-size 0: the metric resolution of a category is its photos' upright size, one size for
    photos stored sideways and upright alike."""
    items = load_meta(phone_photos[1])["test"]["wood_board"]
    assert load_test_script()._mask_size(phone_photos[1], items, 0) == (64, 96)


# --------------------------------------------------------------------------- #
# 2. an image listed twice; a category named twice
# --------------------------------------------------------------------------- #
def item(path: str, anomaly: int = 0) -> dict:
    return {"img_path": path, "mask_path": path.replace(".png", "_mask.png") if anomaly else "", "cls_name": "c",
            "specie_name": "bad" if anomaly else "good", "anomaly": anomaly}


@pytest.mark.parametrize("case, needle", [
    ("test_twice", "test/c: 'test/a.png' is listed twice; list each image once (it would be scored twice)"),
    ("train_twice", "train/c: 'train/r0.png' is listed twice"),
    ("both_splits", "c: 'train/r1.png' is in both the train and the test split"),
    ("dot_spelling", "is listed twice"),
])
def test_an_image_listed_twice_is_refused_naming_it(tmp_path, case, needle, capsys):
    meta = {"train": {"c": [item("train/r0.png"), item("train/r1.png"), item("train/r2.png")]},
            "test": {"c": [item("test/a.png"), item("test/b.png", 1)]}}
    extra = {"test_twice": ("test", item("test/a.png")), "train_twice": ("train", item("train/r0.png")),
             "both_splits": ("test", item("train/r1.png")), "dot_spelling": ("test", item("test/./a.png"))}[case]
    meta[extra[0]]["c"].append(extra[1])
    with pytest.raises(DatasetError, match="listed twice|both the train"):
        validate_meta(meta)
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    results = tmp_path / "results"
    rc = load_test_script().main(["--data-root", str(tmp_path), "--method", "knn", "--backbone", "tiny_clip",
                                  "--results-root", str(results)])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and needle in lines[0] and str(tmp_path / "meta.json") in lines[0], lines
    assert not results.exists()


def test_the_same_train_image_twice_is_never_both_references_of_a_shot():
    meta = {"train": {"c": [item("r0.png"), item("r1.png"), item("r0.png")]}, "test": {"c": []}}
    for seed in range(30):
        refs = [it["img_path"] for it in select_k_shot(meta, "c", 2, seed)]
        assert sorted(refs) == ["r0.png", "r1.png"], seed
    with pytest.raises(ValueError, match="larger than the 2 normal train images"):
        select_k_shot(meta, "c", 3, 0)


def test_distinct_sampling_keeps_the_draws_of_indexes_without_duplicates():
    """The same references as before the change, for every seed: results stay reproducible."""
    items = [item(f"r{i}.png") for i in range(7)]
    meta = {"train": {"c": items[::-1]}, "test": {"c": []}}
    from data.dataset import _category_seed
    for seed in range(10):
        rng = np.random.default_rng(_category_seed(seed, "c"))
        before = [items[i]["img_path"] for i in sorted(rng.choice(7, size=3, replace=False))]
        assert [it["img_path"] for it in select_k_shot(meta, "c", 3, seed)] == before


def test_json_with_a_key_twice_is_refused(tmp_path):
    """json.loads keeps the last of two equal keys: a category given twice would lose its first list."""
    (tmp_path / "meta.json").write_text('{"train": {"c": []}, "test": {"c": [], "c": []}}')
    with pytest.raises(ValueError, match="key 'c' appears twice") as e:
        load_meta(tmp_path)
    assert str(tmp_path / "meta.json") in str(e.value)


def test_a_category_named_twice_is_refused():
    meta = {"train": {"a": [], "b": []}, "test": {"a": [], "b": []}}
    with pytest.raises(ValueError, match="--classes names 'a' more than once"):
        categories(meta, ["a", "b", "a"])


def test_visa_csv_row_twice_names_both_lines(tmp_path):
    root = tmp_path / "visa"
    for name in ("n0", "n1"):
        (root / "candle").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb(1)).save(root / "candle" / f"{name}.tif")  # .tif rows are read like any other
    (root / "split_csv").mkdir()
    rows = ["object,split,label,image,mask", "candle,train,normal,candle/n0.tif,", "candle,test,normal,candle/n1.tif,",
            "candle,test,normal,candle/n0.tif,"]
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    res = subprocess.run([sys.executable, "data/visa.py", "--root", str(root)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "lines 2 and 4" in lines[0] and "candle/n0.tif" in lines[0] and not (root / "meta.json").exists()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows[:3]) + "\n")
    assert visa_indexer.main(["--root", str(root)]) == 0
    assert [it["img_path"] for it in load_meta(root)["test"]["candle"]] == ["candle/n1.tif"]


# --------------------------------------------------------------------------- #
# 3. utils.report aggregate: seeds over different categories are not one mean
# --------------------------------------------------------------------------- #
def finished_run(results: Path, seed: int, cats: dict, folder: str | None = None) -> Path:
    run = results / "m" / "ds" / "1shot" / (folder or f"seed{seed}")
    report.write_run(run, {"seed": seed}, {c: {"i_auroc": v, "p_auroc": v} for c, v in cats.items()})
    return run


def test_aggregate_refuses_seeds_with_other_categories(tmp_path, capsys):
    finished_run(tmp_path, 0, {"a": 0.9, "b": 0.5})
    finished_run(tmp_path, 1, {"a": 0.8, "b": 0.6})
    finished_run(tmp_path, 2, {"a": 0.3})  # a run with --classes a: its mean is over another table
    assert report.main(["aggregate", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "seeds 0, 1 cover 2 categories" in err[0] and "seed 2 (missing b)" in err[0]
    assert not (tmp_path / "summary").exists()
    shutil.rmtree(tmp_path / "m" / "ds" / "1shot" / "seed2")
    assert report.main(["aggregate", str(tmp_path)]) == 0
    csv_text = (tmp_path / "summary" / "m" / "paper.csv").read_text().splitlines()
    assert csv_text[1].startswith("m,1,ds,2,70.0000,0.0000,"), csv_text  # seeds 0 and 1: both means 0.7


def test_aggregate_skips_a_seed_folder_spelled_twice(tmp_path, capsys):
    finished_run(tmp_path, 7, {"a": 0.9})
    finished_run(tmp_path, 7, {"a": 0.1}, folder="seed007")  # not a name test.py writes: not seed 7 again
    runs = report.scan_runs(tmp_path)
    assert [(r.seed, r.per_category["a"]["i_auroc"]) for r in runs] == [(7, 0.9)]
    assert "seed007" in capsys.readouterr().err


def test_metrics_with_a_key_twice_are_skipped_by_name(tmp_path, capsys):
    run = finished_run(tmp_path, 0, {"a": 0.9})
    (run / "metrics.json").write_text('{"per_category": {"a": {"i_auroc": 0.1}, "a": {"i_auroc": 0.9}}}')
    assert report.scan_runs(tmp_path) == []
    assert "key 'a' appears twice" in capsys.readouterr().err


# --------------------------------------------------------------------------- #
# 4. indexers: every readable extension, subfolders of good/ and bad/
# --------------------------------------------------------------------------- #
def save(path: Path, arr: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


def defect(w=W, h=H) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[4:9, 5:12] = 255
    return m


def test_mvtec_indexes_tif_tiff_and_webp(tmp_path, capsys):
    c = tmp_path / "widget"
    save(c / "train/good/000.tif", rgb(0))
    save(c / "train/good/001.TIFF", rgb(1))
    save(c / "train/good/002.webp", rgb(2), lossless=True)
    (c / "train/good/003.heic").write_bytes(b"not decodable here")  # a phone format Pillow lacks: named
    save(c / "test/crack/more/001.png", rgb(5))  # not the MVTec layout: named, not indexed
    save(c / "test/good/000.tiff", rgb(3))
    save(c / "test/crack/000.tif", rgb(4))
    save(c / "ground_truth/crack/000_mask.tif", defect())
    meta = mvtec_indexer.build_meta(tmp_path)
    assert [it["img_path"] for it in meta["train"]["widget"]] == [
        "widget/train/good/000.tif", "widget/train/good/001.TIFF", "widget/train/good/002.webp"]
    assert [(it["img_path"], it["mask_path"]) for it in meta["test"]["widget"]] == [
        ("widget/test/crack/000.tif", "widget/ground_truth/crack/000_mask.tif"), ("widget/test/good/000.tiff", "")]
    err = capsys.readouterr().err
    assert "003.heic" in err and "1 photo(s) skipped" in err
    assert "subfolder(s) with images not indexed: more/" in err


@pytest.fixture
def nested(tmp_path) -> Path:
    """good/ and bad/ with subfolders, masks mirroring bad/, a hidden notebook folder to ignore."""
    root = tmp_path / "widget"
    for i, rel in enumerate(["good/g0.png", "good/day1/g1.jpg", "good/day1/g2.tif", "good/day2/g3.png",
                             "good/day2/deep/g4.webp", "good/g5.png"]):
        save(root / rel, rgb(i), **({"lossless": True} if rel.endswith(".webp") else {}))
    save(root / "good/.ipynb_checkpoints/g0-checkpoint.png", rgb(0))
    for i, rel in enumerate(["bad/b0.png", "bad/dent/b1.png", "bad/scratch/b2.tif", "bad/scratch/b0.png"]):
        save(root / rel, rgb(10 + i))
    save(root / "masks/b0.png", defect())
    save(root / "masks/scratch/b0.png", defect())  # the mirror folder tells the two b0 apart
    save(root / "masks/b1_mask.png", defect())  # flat: b1 is the only bad photo of that stem
    save(root / "masks/scratch/b2.png", defect())
    return root


def test_folder_indexes_subfolders_and_mirrors_masks(nested):
    meta, rule = folder_indexer.build_meta(nested, train_good=2)
    assert [it["img_path"] for it in meta["train"]["widget"]] == ["good/day1/g1.jpg", "good/day1/g2.tif"]
    test = {it["img_path"]: it["mask_path"] for it in meta["test"]["widget"]}
    assert test == {"bad/b0.png": "masks/b0.png", "bad/dent/b1.png": "masks/b1_mask.png",
                    "bad/scratch/b0.png": "masks/scratch/b0.png", "bad/scratch/b2.tif": "masks/scratch/b2.png",
                    "good/day2/deep/g4.webp": "", "good/day2/g3.png": "", "good/g0.png": "", "good/g5.png": ""}
    assert "by path" in rule


def test_folder_train_from_inside_good_leaves_the_test_split(nested):
    meta, _ = folder_indexer.build_meta(nested, train_from=nested / "good/day1")
    train = [it["img_path"] for it in meta["train"]["widget"]]
    test = [it["img_path"] for it in meta["test"]["widget"]]
    assert train == ["good/day1/g1.jpg", "good/day1/g2.tif"] and not set(train) & set(test)
    assert "good/g0.png" in test


def test_folder_same_stem_in_two_subfolders_needs_the_mirror(nested, capsys):
    (nested / "masks/scratch/b0.png").unlink()
    assert folder_indexer.main(["--root", str(nested)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scratch/b0.png" in err[0] and "no mask" in err[0], err


def test_a_folder_input_names_what_it_does_not_read(tmp_path, capsys):
    """predict.py: a folder means the photos directly in it; its photo subfolders and unreadable photos are named."""
    save(tmp_path / "a.png", rgb(0))
    save(tmp_path / "day2" / "b.png", rgb(1))
    save(tmp_path / ".ipynb_checkpoints" / "a-checkpoint.png", rgb(0))
    (tmp_path / "c.HEIC").write_bytes(b"a phone photo this Pillow cannot open")
    (tmp_path / "notes.txt").write_text("not a photo")
    assert folder_indexer.list_image_files(tmp_path) == [tmp_path / "a.png"]
    err = capsys.readouterr().err
    assert "subfolder(s) not searched: day2/" in err and "c.HEIC" in err
    assert "ipynb" not in err and "notes.txt" not in err


# --------------------------------------------------------------------------- #
# 5. predict.py: a reference among the queries, an output folder the inputs read back
# --------------------------------------------------------------------------- #
KNN = ["--method", "knn", "--backbone", "tiny_clip"]


def run_predict(capsys, *args) -> tuple[int, str]:
    rc = predict.main([str(a) for a in args])
    return rc, capsys.readouterr().err


def test_a_query_that_is_a_reference_is_not_scored(datasets, tmp_path, capsys):
    good = datasets[1] / "candle/train/good"
    refs = sorted(good.glob("*.png"))[:2]
    queries = tmp_path / "q"
    queries.mkdir()
    shutil.copy(refs[1], queries / "copy_of_ref.png")  # same bytes, other path
    shutil.copy(datasets[1] / "candle/test/good/000.png", queries / "new.png")
    out = tmp_path / "out"
    rc, err = run_predict(capsys, *KNN, "--refs", *refs, "--images", refs[0], queries, "--out", out)
    assert rc == 0 and "Traceback" not in err, err
    s = json.loads((out / "predictions.json").read_text())
    assert [r["image"] for r in s["predictions"]] == [str(queries / "new.png")]
    assert {k: s["counts"][k] for k in ("queries", "scored", "skipped")} == {"queries": 3, "scored": 1, "skipped": 2}
    assert s["threshold"]["source"] == "references, leave-one-out"  # 2 references: thresholds without labels
    reasons = {k["image"]: k["reason"] for k in s["skipped"]}
    assert f"is the reference {refs[0]}" in reasons[str(refs[0])]
    assert f"has the same bytes as the reference {refs[1]}" in reasons[str(queries / "copy_of_ref.png")]
    assert f"skipped {refs[0]}" in err and "copy_of_ref.png" in err
    # only references: nothing to score, one line
    rc, err = run_predict(capsys, *KNN, "--refs", *refs, "--images", refs[1], "--out", tmp_path / "o2")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and lines == [f"predict.py: error: every query image is one of the references (first: {refs[1]}); "
                                 f"score other photos than the normal references"]


def test_reference_copies_are_used_once(datasets, tmp_path, capsys):
    ref = datasets[1] / "candle/train/good/000.png"
    shutil.copy(ref, tmp_path / "dup.png")
    out = tmp_path / "out"
    rc, err = run_predict(capsys, *KNN, "--refs", ref, tmp_path / "dup.png", "--images",
                          datasets[1] / "candle/test/good/000.png", "--out", out)
    assert rc == 0 and "dup.png has the same bytes as" in err
    assert json.loads((out / "predictions.json").read_text())["references"] == [str(ref)]


@pytest.mark.parametrize("where", ["images_folder", "refs_folder", "glob", "recursive_glob"])
def test_an_output_folder_the_inputs_read_back_is_refused(datasets, tmp_path, capsys, where):
    photos = tmp_path / "photos"
    shutil.copytree(datasets[1] / "candle/test/good", photos)
    refs = datasets[1] / "candle/train/good"
    images, out = str(photos), photos
    if where == "refs_folder":
        refs, out = photos, photos
        images = str(datasets[1] / "wood_board/test/good")
    elif where == "glob":
        images, out = f"{tmp_path}/*/*.png", tmp_path / "out"
    elif where == "recursive_glob":
        images, out = f"{photos}/**/*", photos / "results" / "run1"
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    rc, err = run_predict(capsys, *KNN, "--refs", refs, "--images", images, "--out", out)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"predict.py: error: --out {out} would be read back by "), lines
    assert "outside the inputs" in lines[0]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before  # nothing written


def test_output_folders_the_inputs_do_not_reach_are_fine(tmp_path):
    (tmp_path / "photos").mkdir()
    out = tmp_path / "photos" / "results"
    assert inputs_reaching(out, [("--images", str(tmp_path / "photos"))]) == []  # a folder: its own files only
    assert inputs_reaching(out, [("--images", f"{tmp_path}/photos/*.jpg")]) == []  # outputs are .png
    star = f"{tmp_path}/photos/*/*.png"
    assert inputs_reaching(out, [("--images", star)]) == [f"--images {star!r}"]
    assert inputs_reaching(out, [("--images", f"{tmp_path}/photos/**/*.png")]) != []
    assert inputs_reaching(tmp_path / "photos" / ".hidden", [("--images", f"{tmp_path}/photos/**/*.png")]) == []
