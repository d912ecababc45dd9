"""test.py --save-images N: panels of the most wrong images and the curves, numbers unchanged."""
import json
import os
from pathlib import Path

import pytest

from data.dataset import load_meta
from tests.conftest import load_test_script

ARGS = ["--dataset", "target", "--method", "knn", "--backbone", "tiny_clip", "--eval-size", "32",
        "--classes", "candle", "wood_board"]


def _run(script, data_root, results, *extra) -> Path:
    assert script.main(["--data-root", str(data_root), "--results-root", str(results), "--model-name", "m",
                        *ARGS, *extra]) == 0
    return next(Path(results).rglob("metrics.json")).parent


def _metrics(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    for info in m["categories"].values():
        # a timing and the process's peak memory: measurements of the run, not numbers the option may change
        info.pop("seconds_per_image")
        info.pop("peak_memory_mib", None)
    m.pop("seconds_per_image")
    return m


@pytest.mark.parametrize("n", [2, -1])
def test_save_images_writes_panels_and_curves_without_changing_metrics(datasets, tmp_path, n):
    script = load_test_script()
    root = datasets[1]
    plain = _run(script, root, tmp_path / "plain")
    saved = _run(script, root, tmp_path / "saved", "--save-images", str(n))
    assert _metrics(saved) == _metrics(plain)
    assert not (plain / "images").exists() and not (plain / "curves").exists()
    meta = load_meta(root)
    for cls in ("candle", "wood_board"):
        items = meta["test"][cls]
        normal = sum(1 for it in items if not it["anomaly"])
        anomalous = len(items) - normal
        expected = normal + anomalous if n < 0 else min(n, normal) + min(n, anomalous)
        pngs = sorted((saved / "images" / cls).glob("*.png"))
        assert len(pngs) == expected, pngs
        for kind in ("roc", "pr", "pro"):
            assert (saved / "curves" / f"{cls}_{kind}.png").is_file()


def test_save_images_names_follow_pick_images(datasets, tmp_path):
    """The panels are those of the highest-scoring normal and lowest-scoring anomalous images."""
    import numpy as np
    import torch

    script = load_test_script()
    seen = {}
    real = script.save_category_images

    def spy(run_dir, cls, ds, metrics, labels, scores, *rest):
        seen[cls] = (ds, np.array(labels), np.array(scores))
        return real(run_dir, cls, ds, metrics, labels, scores, *rest)

    script.save_category_images = spy
    run = _run(script, datasets[1], tmp_path, "--save-images", "1")
    for cls, (ds, labels, scores) in seen.items():
        names = script.image_names([it["img_path"] for it in ds.items])
        top_normal = names[int(np.argmax(np.where(labels == 0, scores, -np.inf)))]
        low_anomalous = names[int(np.argmin(np.where(labels == 1, scores, np.inf)))]
        assert sorted(p.stem for p in (run / "images" / cls).glob("*.png")) == sorted([top_normal, low_anomalous])
    assert set(seen) == {"candle", "wood_board"}


def test_image_names_are_unique():
    script = load_test_script()
    assert script.image_names(["c/test/good/000.png", "c/test/crack/000.png", "c/test/crack/001.png"]) == \
        ["good_000", "crack_000", "crack_001"]
    assert script.image_names(["a/x.png", "a/y.png"]) == ["x", "y"]


def test_save_images_option():
    script = load_test_script()
    cfg, _ = script.parse_args(["--data-root", "d", "--save-images", "-1"])
    assert cfg.save_images == -1
    from utils.config import validate_test
    cfg.save_images = -2
    with pytest.raises(ValueError, match="save-images"):
        validate_test(cfg)


def test_launcher_env_sets_save_images(monkeypatch):
    import launch

    args = ["m", "cpu", "0", "nan", "13", "2", "0.5", "0", "1"]
    for key in ("FSAD_SAVE_IMAGES", "FDSL_SAVE_IMAGES", "FSAD_METHOD", "METHOD"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("METHOD", "knn")
    lau = launch.parse_positional(args)
    plan = launch.method_plan(lau)
    mvtec, visa = launch.datasets()
    assert launch.test_config(lau, plan, visa, mvtec).save_images == 0
    monkeypatch.setenv("FSAD_SAVE_IMAGES", "-1")
    assert launch.test_config(lau, plan, visa, mvtec).save_images == -1
