"""Bad input from the issue tracker, end to end: each case is refused (or read correctly) with a message
naming the file or value. Command lines (data/mvtec.py, data/visa.py, utils.report aggregate) must exit
non-zero without a traceback and must neither write nor lose a results file."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.dataset import AnomalyDataset, load_image, load_meta
from data.meta import DatasetError, validate_meta
from utils.report import run_dir, write_run

REPO = Path(__file__).resolve().parents[1]
W, H = 16, 12  # non-square on purpose: width and height must not be swapped anywhere


def run(*args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in res.stderr, res.stderr
    return res


def one_error_line(res: subprocess.CompletedProcess) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def files(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes: compared before and after a refused command."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def rgb(seed=0, w=W, h=H) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def defect_mask(w=W, h=H, value=255, dtype=np.uint8) -> np.ndarray:
    m = np.zeros((h, w), dtype)
    m[3:8, 4:10] = value
    return m


def save(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(path)
    return path


@pytest.fixture
def mvtec(tmp_path) -> Path:
    """One category 'widget' in the MVTec layout: 2 train, 1 good test, 2 cracked test images with masks."""
    root = tmp_path / "mvtec"
    c = root / "widget"
    for i in range(2):
        save(c / "train" / "good" / f"{i:03d}.png", rgb(i))
        save(c / "test" / "crack" / f"{i:03d}.png", rgb(10 + i))
        save(c / "ground_truth" / "crack" / f"{i:03d}_mask.png", defect_mask())
    save(c / "test" / "good" / "000.png", rgb(20))
    return root


def index_mvtec(root: Path, *extra: str) -> subprocess.CompletedProcess:
    return run("data/mvtec.py", "--root", str(root), *extra)


VISA_HEADER = "object,split,label,image,mask"


@pytest.fixture
def visa(tmp_path) -> Path:
    root = tmp_path / "visa"
    save(root / "candle" / "Normal" / "0000.JPG", rgb(0))
    save(root / "candle" / "Normal" / "0001.JPG", rgb(1))
    save(root / "candle" / "Anomaly" / "000.JPG", rgb(2))
    save(root / "candle" / "Masks" / "000.png", defect_mask())
    write_csv(root, ["candle,train,normal,candle/Normal/0000.JPG,",
                     "candle,test,normal,candle/Normal/0001.JPG,",
                     "candle,test,anomaly,candle/Anomaly/000.JPG,candle/Masks/000.png"])
    return root


def write_csv(root: Path, rows: list[str], encoding: str = "utf-8") -> Path:
    path = root / "split_csv" / "1cls.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("\n".join([VISA_HEADER, *rows, ""]).encode(encoding))
    return path


def index_visa(root: Path, *extra: str) -> subprocess.CompletedProcess:
    return run("data/visa.py", "--root", str(root), *extra)


# --------------------------------------------------------------------------- #
# 1. 16-bit and other image modes
# --------------------------------------------------------------------------- #
def test_16bit_dataset_loads_like_its_8bit_twin(mvtec, tmp_path):
    twin = tmp_path / "mvtec16"
    for p in mvtec.rglob("*.png"):
        rel = p.relative_to(mvtec)
        arr = np.asarray(Image.open(p))
        if "ground_truth" in rel.parts:
            save(twin / rel, arr.astype(np.uint16) * 257)  # a 16-bit mask too
        else:  # 16-bit grey, the form 16-bit industrial cameras usually write
            save(twin / rel, arr[..., 0].astype(np.uint16) * 257)
            save(mvtec / rel, arr[..., 0])  # the 8-bit version of the same picture
    for root in (mvtec, twin):
        assert index_mvtec(root).returncode == 0
    for size in (H, 224):
        a = AnomalyDataset(mvtec, "test", size, mask_size=None)
        b = AnomalyDataset(twin, "test", size, mask_size=None)
        for i in range(len(a)):
            x, y = a[i], b[i]
            # resized: plus the 8-bit path's own rounding (see tests/data/test_images.py)
            assert (x["image"] - y["image"]).abs().max() <= (1 if size == H else 1.125) / 255 + 1e-6
            assert torch.equal(x["mask"], y["mask"]) and x["label"] == y["label"]
    with Image.open(twin / "widget" / "train" / "good" / "000.png") as im:
        assert im.mode == "I;16"


def test_float_image_is_refused_by_name_and_mode(mvtec):
    # A TIFF with float pixels, named .png: Pillow goes by content, so the indexer sees mode 'F'.
    bad = mvtec / "widget" / "train" / "good" / "001.png"
    Image.fromarray(np.full((H, W), 0.5, np.float32)).save(bad, format="TIFF")
    before = files(mvtec)
    line = one_error_line(index_mvtec(mvtec))
    assert str(bad) in line and "mode 'F'" in line
    assert files(mvtec) == before  # no meta.json written
    with pytest.raises(ValueError, match="mode 'F'"):
        load_image(bad, 32)


# --------------------------------------------------------------------------- #
# 2. 0/1 masks, empty masks
# --------------------------------------------------------------------------- #
def test_0_1_masks_are_defects(mvtec):
    for p in (mvtec / "widget" / "ground_truth" / "crack").iterdir():
        save(p, defect_mask(value=1))
    assert index_mvtec(mvtec).returncode == 0
    for mask_size in (8, None):
        ds = AnomalyDataset(mvtec, "test", 32, mask_size=mask_size)
        bad = [ds[i] for i in range(len(ds)) if ds.items[i]["anomaly"]]
        assert len(bad) == 2 and all(s["mask"].sum() > 0 and s["label"] == 1 for s in bad)


@pytest.mark.parametrize("indexer", ["mvtec", "visa"])
def test_empty_masks_stop_the_indexer_unless_allowed(request, indexer):
    root = request.getfixturevalue(indexer)
    masks = sorted((root / "widget" / "ground_truth" / "crack").iterdir()) if indexer == "mvtec" \
        else [root / "candle" / "Masks" / "000.png"]
    for m in masks:
        save(m, np.zeros((H, W), np.uint8))
    index = index_mvtec if indexer == "mvtec" else index_visa
    (root / "meta.json").write_text('{"an": "older index"}')  # must survive a refused run
    before = files(root)
    line = one_error_line(index(root))
    assert f"{len(masks)} anomalous image(s)" in line and "empty mask" in line and "--allow-empty-masks" in line
    assert all(m.relative_to(root).as_posix() in line for m in masks)
    assert files(root) == before

    res = index(root, "--allow-empty-masks")
    assert res.returncode == 0, res.stderr
    assert res.stderr.startswith("warning: ") and masks[0].relative_to(root).as_posix() in res.stderr
    kept = [it for items in load_meta(root)["test"].values() for it in items if it["anomaly"]]
    assert len(kept) == len(masks)


# --------------------------------------------------------------------------- #
# 3. mask size differs from its image
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("indexer", ["mvtec", "visa"])
def test_mask_of_another_size_is_refused_at_indexing(request, indexer):
    root = request.getfixturevalue(indexer)
    if indexer == "mvtec":
        img, mask = root / "widget" / "test" / "crack" / "001.png", root / "widget" / "ground_truth" / "crack" / "001_mask.png"
    else:
        img, mask = root / "candle" / "Anomaly" / "000.JPG", root / "candle" / "Masks" / "000.png"
    save(mask, defect_mask(w=2 * W, h=2 * H))
    before = files(root)
    line = one_error_line(run_indexer(indexer, root))
    assert str(mask) in line and str(img) in line and f"{2 * W}x{2 * H}" in line and f"{W}x{H}" in line
    assert files(root) == before


def run_indexer(name: str, root: Path, *extra: str) -> subprocess.CompletedProcess:
    return (index_mvtec if name == "mvtec" else index_visa)(root, *extra)


@pytest.mark.parametrize("mask_size", [240, None])  # the default eval size, and eval size 0
def test_mask_of_another_size_is_refused_at_loading(mvtec, mask_size):
    assert index_mvtec(mvtec).returncode == 0
    mask = mvtec / "widget" / "ground_truth" / "crack" / "000_mask.png"
    save(mask, defect_mask(w=W + 1, h=H))  # replaced after indexing
    ds = AnomalyDataset(mvtec, "test", 32, mask_size=mask_size)
    i = next(i for i, it in enumerate(ds.items) if it["mask_path"].endswith("000_mask.png"))
    with pytest.raises(ValueError) as e:
        ds[i]
    msg = str(e.value)
    assert str(mask) in msg and "widget/test/crack/000.png" in msg and f"{W + 1}x{H}" in msg and f"{W}x{H}" in msg


# --------------------------------------------------------------------------- #
# 4. paths that leave the dataset root
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("key, value", [
    ("img_path", "../outside.png"), ("img_path", "widget/../../outside.png"), ("img_path", "/etc/passwd"),
    ("mask_path", "../m.png"), ("mask_path", "C:/data/m.png"),
])
def test_meta_paths_must_stay_inside_the_root(tmp_path, key, value):
    item = {"img_path": "widget/test/crack/000.png", "mask_path": "widget/m.png", "cls_name": "widget",
            "specie_name": "crack", "anomaly": 1, key: value}
    (tmp_path / "meta.json").write_text(json.dumps({"train": {"widget": []}, "test": {"widget": [item]}}))
    with pytest.raises(ValueError) as e:
        load_meta(tmp_path)
    assert "meta.json" in str(e.value) and repr(value) in str(e.value) and "test/widget" in str(e.value)
    with pytest.raises(ValueError, match="leaves the dataset root"):
        AnomalyDataset(tmp_path, "test", 8, items=[item])[0]


def test_inner_dot_dot_is_fine(tmp_path):
    item = {"img_path": "a/../b.png", "mask_path": "", "cls_name": "a", "specie_name": "good", "anomaly": 0}
    validate_meta({"train": {"a": [item]}, "test": {}})
    save(tmp_path / "b.png", rgb())
    (tmp_path / "a").mkdir()  # the OS resolves a/.. only through an existing folder
    assert AnomalyDataset(tmp_path, "train", 8, items=[item])[0]["image"].shape == (3, 8, 8)


@pytest.mark.parametrize("value", ["../outside.png", "candle/../../outside.png", "/tmp/outside.png",
                                   r"C:\visa\outside.png"])
def test_visa_rows_leaving_the_root_are_refused(visa, value):
    save(visa.parent / "outside.png", rgb())  # exists, so only the rule can refuse it
    csv = write_csv(visa, ["candle,train,normal,candle/Normal/0000.JPG,",
                           f"candle,test,anomaly,candle/Anomaly/000.JPG,{value}"])
    before = files(visa)
    line = one_error_line(index_visa(visa))
    assert f"{csv} line 3" in line and repr(value) in line and "leaves the dataset root" in line
    assert files(visa) == before


# --------------------------------------------------------------------------- #
# 5. VisA CSV encodings
# --------------------------------------------------------------------------- #
ROWS_NON_ASCII = ["candle,train,normal,candle/Normal/0000.JPG,", "candle,test,normal,candle/Normal/0001.JPG,",
                  "candle,test,anomaly,candle/Anomaly/000.JPG,candle/Masks/défaut.png"]


@pytest.mark.parametrize("encoding, needle", [
    ("latin-1", "not UTF-8 text (byte 0xe9 on line 4"),
    ("cp1252", "not UTF-8 text"),
    ("utf-16", "is UTF-16 text"),        # with a byte-order mark
    ("utf-16-le", "NUL bytes"),          # without one
])
def test_csv_that_is_not_utf8_is_refused_in_one_line(visa, encoding, needle):
    save(visa / "candle" / "Masks" / "défaut.png", defect_mask())
    csv = write_csv(visa, ROWS_NON_ASCII, encoding)
    before = files(visa)
    line = one_error_line(index_visa(visa))
    assert str(csv) in line and needle in line and "UTF-8" in line
    assert files(visa) == before


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig"])
def test_utf8_csv_with_or_without_bom(visa, encoding):
    save(visa / "candle" / "Masks" / "défaut.png", defect_mask())
    write_csv(visa, ROWS_NON_ASCII, encoding)
    res = index_visa(visa)
    assert res.returncode == 0, res.stderr
    assert load_meta(visa)["test"]["candle"][0]["mask_path"] == "candle/Masks/défaut.png"


# --------------------------------------------------------------------------- #
# 6. malformed metrics.json in the report aggregator
# --------------------------------------------------------------------------- #
GOOD = {"i_auroc": 0.9, "i_ap": 0.8, "i_f1max": 0.7, "p_auroc": 0.6, "p_ap": 0.5, "p_f1max": 0.4, "p_aupro": 0.3}
MALFORMED = {
    "invalid_json": '{"per_category": {"a": ',
    "not_utf8": b'{"per_category": {"\xe9": {}}}',
    "list": "[]",
    "per_category_list": '{"per_category": [0.9]}',
    "category_not_object": '{"per_category": {"bottle": 0.9}}',
    "string_value": '{"per_category": {"bottle": {"i_auroc": "abc"}}}',
    "bool_value": '{"per_category": {"bottle": {"i_auroc": true}}}',
    "percent_value": '{"per_category": {"bottle": {"i_auroc": 97.0}}}',
    "bad_mean": '{"per_category": {"bottle": {"i_auroc": 0.9}}, "mean": {"p_aupro": [1]}}',
}


def write_malformed(results: Path, content) -> Path:
    bad = run_dir(results, "m", "mvtec", 1, 7) / "metrics.json"
    bad.parent.mkdir(parents=True)
    (bad.write_bytes if isinstance(content, bytes) else bad.write_text)(content)
    return bad


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_aggregate_skips_a_malformed_run_and_names_it(tmp_path, kind):
    results = tmp_path / "results"
    write_run(run_dir(results, "m", "mvtec", 1, 0), {}, {"bottle": GOOD})
    bad = write_malformed(results, MALFORMED[kind])
    content = bad.read_bytes()
    res = run("-m", "utils.report", "aggregate", str(results))
    assert res.returncode == 0, res.stderr
    assert f"warning: skipping {bad}" in res.stderr
    assert "skipped 1 run(s)" in res.stdout
    assert bad.read_bytes() == content  # never rewritten or deleted
    paper = (results / "summary" / "m" / "paper.md").read_text()
    assert "| 1       | mvtec     | 1       |" in paper  # one seed: the malformed one is not counted


def test_aggregate_with_only_malformed_runs_writes_nothing(tmp_path):
    results = tmp_path / "results"
    bad = write_malformed(results, MALFORMED["string_value"])
    before = files(results)
    res = run("-m", "utils.report", "aggregate", str(results))
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert lines[0].startswith(f"warning: skipping {bad}: ") and "'abc'" in lines[0]
    assert lines[1].startswith("error: no finished run") and "skipped 1 run(s)" in lines[1]
    assert files(results) == before and not (results / "summary").exists()


# --------------------------------------------------------------------------- #
# kept working: unusual folder names, damaged files
# --------------------------------------------------------------------------- #
def test_roots_with_spaces_and_non_ascii(tmp_path):
    from data.synthetic import generate

    root = generate(tmp_path / "my data" / "Prüfstand 検査", ("tiles",), seed=0, size=32, n_train=2,
                    n_test_good=1, n_test_bad=2)
    (root / "meta.json").unlink()
    res = index_mvtec(root)
    assert res.returncode == 0 and str(root) in res.stdout, res.stderr
    ds = AnomalyDataset(root, "test", 16, mask_size=None)
    assert sum(ds[i]["label"] for i in range(len(ds))) == 2


def test_truncated_image_is_named_in_one_line(mvtec):
    assert index_mvtec(mvtec).returncode == 0
    img = mvtec / "widget" / "test" / "good" / "000.png"
    data = img.read_bytes()
    img.write_bytes(data[: len(data) // 2])
    ds = AnomalyDataset(mvtec, "test", 32)
    i = next(i for i, it in enumerate(ds.items) if it["img_path"] == "widget/test/good/000.png")
    with pytest.raises(ValueError) as e:
        ds[i]
    assert str(e.value) == f"cannot read image {img}: image file is truncated"
    # a damaged mask is decoded (and so caught) already by the indexer
    mask = mvtec / "widget" / "ground_truth" / "crack" / "000_mask.png"
    mask.write_bytes(mask.read_bytes()[:-30])
    img.write_bytes(data)
    line = one_error_line(index_mvtec(mvtec))
    assert f"cannot read mask {mask}" in line


def test_dataset_error_is_a_value_error():
    # train.py/test.py print ValueError as one line (utils/cli.py); refusals from data/ must stay one.
    assert issubclass(DatasetError, ValueError)
