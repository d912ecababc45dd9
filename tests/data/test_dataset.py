import json

import numpy as np
import pytest
import torch
from PIL import Image

from data.dataset import (AnomalyDataset, DefectCrop, Mosaic, categories, load_image, load_mask, load_meta,
                          select_k_shot)


def fake_meta(n_train=8):
    train = [{"img_path": f"a/train/good/{i:03d}.png", "mask_path": "", "cls_name": "a", "specie_name": "good",
              "anomaly": 0} for i in range(n_train)]
    return {"train": {"a": train, "b": train[:2]}, "test": {"a": [], "b": []}}


def test_k_shot_is_deterministic_without_repeats():
    meta = fake_meta()
    for k in (1, 2, 4, 8):
        first = select_k_shot(meta, "a", k, seed=14)
        assert first == select_k_shot(meta, "a", k, seed=14)
        paths = [it["img_path"] for it in first]
        assert len(set(paths)) == k
    draws = {tuple(it["img_path"] for it in select_k_shot(meta, "a", 2, seed=s)) for s in range(10)}
    assert len(draws) > 1  # the seed matters


def test_k_shot_larger_than_the_split_is_a_clear_error():
    with pytest.raises(ValueError, match=r"k-shot 3 .* 2 normal train images of category 'b'"):
        select_k_shot(fake_meta(), "b", 3, seed=0)


def test_unknown_category_and_missing_meta(tmp_path):
    with pytest.raises(ValueError, match="unknown category"):
        categories(fake_meta(), ["zzz"])
    with pytest.raises(FileNotFoundError, match="data/mvtec.py"):
        load_meta(tmp_path)
    with pytest.raises(FileNotFoundError, match="dataset root not found"):
        load_meta(tmp_path / "nope")


def write_item(root, name, mask=None, size=32):
    img = np.zeros((size, size, 3), np.uint8)
    img[:, : size // 2] = 200
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(root / name)
    item = {"img_path": name, "mask_path": "", "cls_name": "a", "specie_name": "good", "anomaly": 0}
    if mask is not None:
        mpath = name.replace(".png", "_mask.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(root / mpath)
        item.update(mask_path=mpath, anomaly=1, specie_name="bad")
    return item


def test_loading_resizes_and_binarises(tmp_path):
    mask = np.zeros((32, 32), np.float32)
    mask[4:12, 20:28] = 1
    item = write_item(tmp_path, "x.png", mask)
    img = load_image(tmp_path / "x.png", 16)
    assert img.shape == (3, 16, 16)
    # away from the edge the halves keep their exact values (8-bit 200 -> 200/255, 0 -> 0); a wrong scale,
    # channel order or a flip would show here, not in a [0, 1] range check
    assert torch.all(img[:, :, :6] == 200 / 255) and torch.all(img[:, :, 10:] == 0)
    assert 0 < img[0, 0, 8] < img[0, 0, 7] < 200 / 255 + 0.02  # the resampled edge lies in between
    m = load_mask(tmp_path / item["mask_path"], 16)
    assert m.shape == (16, 16) and set(m.unique().tolist()) == {0.0, 1.0}
    assert m[2:6, 10:14].all() and m.sum() == 16
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png", 16)


def test_mosaic_and_crop_keep_masks_aligned(tmp_path):
    mask = np.zeros((32, 32), np.float32)
    mask[8:24, 8:24] = 1
    items = [write_item(tmp_path, f"{i}.png", mask) for i in range(3)]
    ds = AnomalyDataset(tmp_path, "test", 32, items=items, augment=Mosaic(p=1.0), seed=3)
    sample = ds[0]
    assert sample["image"].shape == (3, 32, 32) and sample["mask"].shape == (32, 32)
    # each quadrant is a half-size copy of an image whose defect is the central square
    assert sample["mask"].sum() == 4 * 64
    assert sample["mask"][4:12, 4:12].all() and not sample["mask"][0:4].any()
    # the image's bright left half is visible in every quadrant's left half
    assert sample["image"][:, :, 0:8].mean() > 0.6 and sample["image"][:, :, 8:16].mean() < 0.1
    again = AnomalyDataset(tmp_path, "test", 32, items=items, augment=Mosaic(p=1.0), seed=3)[0]
    assert torch.equal(again["image"], sample["image"])  # (seed, epoch, index) fixes the draw

    crop = AnomalyDataset(tmp_path, "test", 32, items=items, augment=DefectCrop(p=1.0, plus=1.0), seed=0)
    for i in range(3):
        for epoch in range(5):
            crop.set_epoch(epoch)
            s = crop[i]
            assert s["mask"].shape == (32, 32) and s["mask"].max() == 1 and s["label"] == 1


def test_corrupt_files_are_named(tmp_path):
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"train": {"a": [{"img_path": "x.png"}]}, "test": {}}))
    with pytest.raises(ValueError, match=r"meta.json: train/a: item must have exactly the keys"):
        load_meta(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        load_image(tmp_path / "broken.png", 16)


def test_calibration_photos_are_normal_train_photos_besides_the_references():
    from data.dataset import select_calibration

    meta = {"train": {"c": [{"img_path": f"{i:03d}.png", "anomaly": 0} for i in range(10)]
                      + [{"img_path": "bad.png", "anomaly": 1}]}}
    for seed in range(5):
        refs = select_k_shot(meta, "c", 4, seed)
        cal = select_calibration(meta, "c", refs, 6, seed)
        assert len(cal) == 6 and not {it["img_path"] for it in cal} & {it["img_path"] for it in refs}
        assert "bad.png" not in {it["img_path"] for it in cal}
        assert cal == select_calibration(meta, "c", refs, 6, seed)  # reproducible
    with pytest.raises(ValueError, match="--calibrate 7 needs 7 normal train images of category 'c' besides its 4"):
        select_calibration(meta, "c", select_k_shot(meta, "c", 4, 0), 7, 0)
    with pytest.raises(ValueError, match="--calibrate must be >= 1"):
        select_calibration(meta, "c", [], 0, 0)
