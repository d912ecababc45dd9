"""data/folder.py: a flat good/ bad/ (masks/) folder -> a one-category meta.json the loader accepts."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.dataset import AnomalyDataset, load_meta, select_k_shot
from data.folder import MISSING_MASKS_KEY, build_meta, main, validate_folder_meta
from data.meta import DatasetError

REPO = Path(__file__).resolve().parents[2]
W, H = 20, 14  # non-square on purpose


def save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def photo(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def mask() -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[3:7, 5:12] = 255
    return m


@pytest.fixture
def flat(tmp_path) -> Path:
    """6 good (png and jpg), 3 bad (one tif), masks with the same stems in other formats."""
    root = tmp_path / "widget_photos"
    for i in range(6):
        save(root / "good" / f"g{i}.{'jpg' if i % 2 else 'png'}", photo(i))
    for i, ext in enumerate(("png", "jpg", "tif")):
        save(root / "bad" / f"b{i}.{ext}", photo(10 + i))
    save(root / "masks" / "b0.png", mask())
    save(root / "masks" / "b1.bmp", mask())
    save(root / "masks" / "b2_mask.png", mask())
    return root


def paths(items):
    return [it["img_path"] for it in items]


def test_flat_folder_with_masks_becomes_a_valid_meta(flat, capsys):
    assert main(["--root", str(flat), "--name", "widget", "--train-good", "2"]) == 0
    assert "first 2 of good/" in capsys.readouterr().out
    meta = load_meta(flat)  # the project's own validation
    assert paths(meta["train"]["widget"]) == ["good/g0.png", "good/g1.jpg"]
    test = meta["test"]["widget"]
    assert paths(test) == ["bad/b0.png", "bad/b1.jpg", "bad/b2.tif", "good/g2.png", "good/g3.jpg", "good/g4.png",
                           "good/g5.jpg"]  # the references left the test split
    masks = {it["img_path"]: it["mask_path"] for it in test if it["anomaly"]}
    assert masks == {"bad/b0.png": "masks/b0.png", "bad/b1.jpg": "masks/b1.bmp", "bad/b2.tif": "masks/b2_mask.png"}
    ds = AnomalyDataset(flat, "test", 32, items=test, mask_size=None)
    sample = ds[0]
    assert sample["label"] == 1 and sample["mask"].shape == (H, W) and sample["mask"].sum() == 4 * 7
    assert len(select_k_shot(meta, "widget", 2, seed=0)) == 2


def test_default_train_split_and_the_name_of_the_root(flat):
    meta, rule = build_meta(flat)
    assert list(meta["train"]) == ["widget_photos"]
    assert len(meta["train"]["widget_photos"]) == 4 and "first 4" in rule


def test_train_good_folder_is_used_when_present(flat):
    save(flat / "train" / "good" / "r0.png", photo(20))
    meta, rule = build_meta(flat, "widget")
    assert paths(meta["train"]["widget"]) == ["train/good/r0.png"] and rule == "train/good/"
    assert sum(1 for it in meta["test"]["widget"] if not it["anomaly"]) == 6  # all of good/ stays in the test
    with pytest.raises(DatasetError, match="train/good exists and --train-good"):
        build_meta(flat, "widget", train_good=2)


def test_train_from_a_folder_inside_the_root(flat, tmp_path):
    save(flat / "refs" / "r0.png", photo(30))
    save(flat / "refs" / "r1.png", photo(31))
    meta, _ = build_meta(flat, "widget", train_from=flat / "refs")
    assert paths(meta["train"]["widget"]) == ["refs/r0.png", "refs/r1.png"]
    save(tmp_path / "outside" / "r.png", photo(32))
    with pytest.raises(DatasetError, match="inside --root"):
        build_meta(flat, "widget", train_from=tmp_path / "outside")
    with pytest.raises(DatasetError, match="is good/ itself"):
        build_meta(flat, "widget", train_from=flat / "good")


def test_bad_photos_without_masks_are_refused_unless_allowed(flat, capsys):
    (flat / "masks" / "b1.bmp").unlink()
    before = sorted(p.name for p in flat.iterdir())
    assert main(["--root", str(flat)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "b1.jpg" in err[0] and "--allow-missing-masks" in err[0]
    assert sorted(p.name for p in flat.iterdir()) == before  # nothing written
    assert main(["--root", str(flat), "--allow-missing-masks"]) == 0
    meta = json.loads((flat / "meta.json").read_text())
    assert meta[MISSING_MASKS_KEY] is True
    bad = {it["img_path"]: it["mask_path"] for it in meta["test"]["widget_photos"] if it["anomaly"]}
    assert bad == {"bad/b0.png": "masks/b0.png", "bad/b1.jpg": "", "bad/b2.tif": "masks/b2_mask.png"}
    validate_folder_meta(meta)
    del meta[MISSING_MASKS_KEY]  # the flag is what licenses an anomalous item without a mask
    with pytest.raises(DatasetError, match="need a mask_path"):
        validate_folder_meta(meta)


def test_complete_masks_write_no_flag(flat):
    meta, _ = build_meta(flat, allow_missing_masks=True)
    assert MISSING_MASKS_KEY not in meta


@pytest.mark.parametrize("case, message", [
    ("no_bad", "bad folder not found"),
    ("empty_good", "no image in"),
    ("mask_size", "a mask must have its image's size"),
    ("ambiguous", "ambiguous masks"),
    ("too_few", "would leave no normal test photo"),
])
def test_layout_problems_are_one_line_errors(flat, case, message, capsys):
    args = ["--root", str(flat)]
    if case == "no_bad":
        for p in (flat / "bad").iterdir():
            p.unlink()
        (flat / "bad").rmdir()
    elif case == "empty_good":
        for p in (flat / "good").iterdir():
            p.unlink()
    elif case == "mask_size":
        save(flat / "masks" / "b0.png", np.zeros((W, H), np.uint8) + 255)  # transposed size
    elif case == "ambiguous":
        save(flat / "masks" / "b0.tif", mask())
    else:
        args += ["--train-good", "6"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (flat / "meta.json").exists()


def test_orphan_masks_are_named_in_a_warning(flat, capsys):
    save(flat / "masks" / "b9.png", mask())
    build_meta(flat)
    assert "b9.png" in capsys.readouterr().err


def test_command_line_runs_as_a_script(flat):
    res = subprocess.run([sys.executable, "data/folder.py", "--root", str(flat), "--train-good", "3"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout and load_meta(flat)["train"]
