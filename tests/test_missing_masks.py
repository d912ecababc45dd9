"""Datasets whose anomalous photos lack some masks (data/folder.py --allow-missing-masks): validation,
loading, test.py (image metrics on all photos, pixel metrics on the masked ones) and train.py refusing them."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.dataset import AnomalyDataset, load_image, load_meta
from data.folder import main as index_folder
from data.meta import MISSING_MASKS_KEY, DatasetError, sort_meta, validate_meta, write_meta
from tests.conftest import load_test_script

S = 32


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _photo(seed: int, defect: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((S, S, 3), 120, np.uint8) + rng.integers(0, 20, (S, S, 3), dtype=np.uint8)
    if defect:
        img[8:20, 10:22] = (250, 20, 20)
    return img


@pytest.fixture
def flat(tmp_path) -> Path:
    """8 good photos (the first 4 become train references), 5 bad ones, masks for 3 of them."""
    root = tmp_path / "gadget"
    for i in range(8):
        _save(root / "good" / f"g{i}.png", _photo(i, False))
    m = np.zeros((S, S), np.uint8)
    m[8:20, 10:22] = 255
    for i in range(5):
        _save(root / "bad" / f"b{i}.png", _photo(100 + i, True))
        if i < 3:
            _save(root / "masks" / f"b{i}.png", m)
    assert index_folder(["--root", str(root), "--allow-missing-masks"]) == 0
    return root


def test_meta_flag_licenses_unmasked_anomalous_test_items(flat):
    meta = load_meta(flat)
    assert meta[MISSING_MASKS_KEY] is True
    unmasked = [it for it in meta["test"]["gadget"] if it["anomaly"] and not it["mask_path"]]
    assert len(unmasked) == 2
    assert sort_meta(meta)[MISSING_MASKS_KEY] is True
    path, _ = write_meta(flat, meta)
    assert json.loads(path.read_text())[MISSING_MASKS_KEY] is True  # kept through write_meta
    with pytest.raises(DatasetError, match="need a mask_path"):
        validate_meta({k: v for k, v in meta.items() if k != MISSING_MASKS_KEY})
    with pytest.raises(DatasetError, match="true or false"):
        validate_meta({**meta, MISSING_MASKS_KEY: "yes"})
    with pytest.raises(DatasetError, match="exactly the keys"):
        validate_meta({**meta, "other": 1})
    bad_train = json.loads(json.dumps(meta))
    bad_train["train"]["gadget"][0].update(anomaly=1)
    with pytest.raises(DatasetError, match="^train/gadget"):
        validate_meta(bad_train)  # the flag is for the test split only


def test_dataset_gives_zero_mask_and_has_mask(flat):
    ds = AnomalyDataset(flat, "test", 16, mask_size=16)
    by_path = {ds.items[i]["img_path"]: ds[i] for i in range(len(ds))}
    unmasked = by_path["bad/b4.png"]
    assert unmasked["label"] == 1 and unmasked["has_mask"] is False
    assert unmasked["mask"].shape == (16, 16) and unmasked["mask"].max() == 0
    assert by_path["bad/b0.png"]["has_mask"] is True and by_path["bad/b0.png"]["mask"].max() == 1
    assert by_path["good/g5.png"]["has_mask"] is True and by_path["good/g5.png"]["label"] == 0


def test_evaluation_uses_masked_images_for_pixel_metrics(flat, tmp_path):
    from methods.base import InferenceOptions
    from utils.metrics import compute_category_metrics

    script = load_test_script()
    results = tmp_path / "results"
    assert script.main(["--data-root", str(flat), "--dataset", "gadget", "--method", "knn", "--backbone",
                        "tiny_clip", "--results-root", str(results), "--model-name", "m", "--eval-size", "32",
                        "--k-shot", "2"]) == 0
    run = next(results.rglob("metrics.json")).parent
    metrics = json.loads((run / "metrics.json").read_text())
    info = metrics["categories"]["gadget"]
    assert (info["n_test"], info["n_pixel_eval"], info["n_missing_masks"]) == (9, 7, 2)
    assert "without a mask" in (run / "table.md").read_text() and "gadget 2 of 9" in (run / "table.md").read_text()

    # recomputed outside test.py from the references it recorded
    config = json.loads((run / "config.json").read_text())
    from methods.checkpoint import build_method

    method, _ = build_method("", "knn", "tiny_clip")
    method.configure(InferenceOptions())
    refs = config["references"]["gadget"]
    state = method.fit(torch.stack([load_image(flat / r, method.image_size) for r in refs]), refs)
    ds = AnomalyDataset(flat, "test", method.image_size, items=load_meta(flat)["test"]["gadget"], mask_size=32)
    samples = [ds[i] for i in range(len(ds))]
    maps, raw = method.predict(torch.stack([s["image"] for s in samples]), state, (32, 32))
    labels = np.array([s["label"] for s in samples])
    keep = np.array([s["has_mask"] for s in samples])
    masks = torch.stack([s["mask"] for s in samples]).numpy() > 0.5
    scores = method.image_scores(raw, maps).numpy()
    expected = compute_category_metrics(labels, scores, masks[keep], maps.numpy()[keep])
    everything = compute_category_metrics(labels, scores, masks, maps.numpy())
    got = metrics["per_category"]["gadget"]
    assert got["p_auroc"] == pytest.approx(expected["p_auroc"], abs=1e-6)
    assert got["p_aupro"] == pytest.approx(expected["p_aupro"], abs=1e-6)
    assert got["i_auroc"] == pytest.approx(expected["i_auroc"], abs=1e-6)
    # unmasked defects scored as defect-free pixels would give other numbers: the test tells them apart
    assert abs(everything["p_auroc"] - expected["p_auroc"]) > 1e-4


def test_training_refuses_missing_masks(flat, tmp_path):
    import train
    from utils.config import MethodConfig, TrainConfig

    cfg = TrainConfig(data_root=str(flat), dataset="gadget", out_dir=str(tmp_path / "ckpt"),
                      method=MethodConfig(backbone="tiny_clip"), epochs=1, batch_size=4, train_k_shot=2)
    with pytest.raises(ValueError, match=r"dataset 'gadget' .* has 2 anomalous test image\(s\) without a mask"):
        train.train(cfg)
    assert not list((tmp_path / "ckpt").glob("*.pth"))


def test_train_cli_refusal_is_one_line(flat, tmp_path, capsys):
    import train

    rc = train.main(["--data-root", str(flat), "--dataset", "gadget", "--out-dir", str(tmp_path / "ckpt"),
                     "--backbone", "tiny_clip", "--epochs", "1"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert rc != 0 and len(err) == 1, err
    assert "dataset 'gadget'" in err[0] and "2 anomalous test image(s) without a mask" in err[0]
