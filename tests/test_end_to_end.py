"""Train on one synthetic dataset, test on the other (the cross-dataset protocol, tiny backbone)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from conftest import load_test_script, recompute_run_metrics
from data.dataset import AnomalyDataset, load_image, load_meta, select_k_shot
from methods import create_method, resolve_method_config
from methods.checkpoint import load_method, read_checkpoint
from methods.knn import KNNMethod
from utils.config import MethodConfig, TestConfig, TrainConfig
from utils.metrics import auroc

def pixel_auroc(detector, root, predict):
    meta = load_meta(root)
    scores = []
    for cls in sorted(meta["test"]):
        refs = select_k_shot(meta, cls, 1, seed=0)
        bank = detector.build_bank(torch.stack([load_image(root / r["img_path"], detector.image_size) for r in refs]))
        ds = AnomalyDataset(root, "test", detector.image_size, [cls], mask_size=64)
        images = torch.stack([ds[i]["image"] for i in range(len(ds))])
        masks = torch.stack([ds[i]["mask"] for i in range(len(ds))])
        maps, _ = predict(detector, images, bank)
        scores.append(auroc(masks.numpy().ravel() > 0.5, maps.numpy().ravel()))
    return float(np.mean(scores))


@pytest.mark.slow
def test_trained_heads_beat_untrained_heads_cross_dataset(datasets, trained):
    target = datasets[1]
    heads = lambda det, x, bank: det.predict_whole(x, bank, (64, 64))
    torch.manual_seed(0)
    untrained = create_method(resolve_method_config(MethodConfig(backbone="tiny_clip"))).eval()
    detector, _ = load_method(trained)
    before, after = pixel_auroc(untrained, target, heads), pixel_auroc(detector, target, heads)
    baseline = pixel_auroc(KNNMethod(detector.backbone).eval(), target, heads)  # the knn method
    print(f"\npixel AUROC on the unseen dataset: untrained heads {before:.3f}, trained heads {after:.3f}, "
          f"raw feature distance {baseline:.3f}")
    assert after > before + 0.15, (before, after)
    assert after > 0.85


@pytest.mark.slow
def test_training_resumes_and_skips_finished_runs(datasets, tmp_path):
    cfg = TrainConfig(data_root=str(datasets[0]), dataset="aux", out_dir=str(tmp_path), classes=["tiles"],
                      method=MethodConfig(backbone="tiny_clip"), epochs=2, batch_size=4, train_k_shot=2, seed=3)
    full = train.train(cfg)
    reference = read_checkpoint(full)["state"]
    (tmp_path / "epoch_2.pth").unlink()  # interrupted after epoch 1
    resumed = read_checkpoint(train.train(cfg))
    for k, v in reference.items():
        torch.testing.assert_close(resumed["state"][k], v, msg=k)
    mtime = (tmp_path / "epoch_2.pth").stat().st_mtime_ns
    train.train(cfg)  # finished: nothing is redone
    assert (tmp_path / "epoch_2.pth").stat().st_mtime_ns == mtime
    ckpt = torch.load(full, weights_only=True)  # plain containers only
    assert ckpt["backbones"]["backbone"]["model"] == "tiny-ViT-p14" and ckpt["epoch"] == 2
    assert json.loads((tmp_path / "train_config.json").read_text())["seed"] == 3


@pytest.mark.slow
def test_evaluation_writes_results_and_is_reproducible(datasets, trained, tmp_path):
    test_script = load_test_script()
    cfg = TestConfig(data_root=str(datasets[1]), dataset="target", checkpoint=str(trained),
                     results_root=str(tmp_path), model_name="e2e", k_shot=2, seed=5)
    run = test_script.evaluate(cfg)
    assert run == tmp_path / "e2e" / "target" / "2shot" / "seed5"
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert set(metrics["per_category"]) == {"candle", "wood_board"}
    # trained heads localise the unseen dataset's defects (about 0.9 pixel AUROC, 0.65 AUPRO when written)
    for cls, m in metrics["per_category"].items():
        assert m["p_auroc"] > 0.8 and m["p_aupro"] > 0.5, (cls, m)
    assert metrics["mean"]["i_auroc"] > 0.8, metrics["mean"]
    # and metrics.json describes what the checkpoint computes on the recorded references
    for cls, m in recompute_run_metrics(run).items():
        for key in ("i_auroc", "i_ap", "p_auroc", "p_ap", "p_aupro"):
            assert metrics["per_category"][cls][key] == pytest.approx(m[key], abs=1e-6), (cls, key)
    refs = config["references"]["candle"]
    assert len(refs) == 2 and len(set(refs)) == 2
    assert config["test"]["k_shot"] == 2 and config["backbones"]["backbone"]["name"] == "tiny_clip"
    assert (run / "table.md").read_text().count("|") > 20
    log = (run / "log.txt").read_text()
    assert "candle: i-AUROC" in log and "wood_board: i-AUROC" in log
    # same seed -> same numbers
    again = test_script.evaluate(cfg, force=True)
    assert json.loads((again / "metrics.json").read_text())["per_category"] == metrics["per_category"]
    # a finished run with another configuration is refused, not silently reused
    with pytest.raises(ValueError, match="another configuration"):
        test_script.evaluate(TestConfig(**{**cfg.__dict__, "eval_size": 120}))


def test_training_with_unequal_banks_and_an_empty_category(datasets, tmp_path):
    """A category with fewer normal train images than train_k_shot gets a smaller bank, and
    batches that mix it with others still align; a category without any is named."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(datasets[0], root)
    meta = json.loads((root / "meta.json").read_text())
    meta["train"]["bolt"] = meta["train"]["bolt"][:1]
    (root / "meta.json").write_text(json.dumps(meta))
    cfg = TrainConfig(data_root=str(root), dataset="aux", out_dir=str(tmp_path / "ckpt"), epochs=1, batch_size=8,
                      method=MethodConfig(backbone="tiny_clip"), train_k_shot=4, max_steps=3)
    assert train.train(cfg).is_file()
    meta["train"]["bolt"] = []
    (root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="category 'bolt' has no normal train images"):
        train.train(TrainConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "other")}))
