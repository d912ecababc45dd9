"""Shared fixtures: two small synthetic datasets (aux -> target) and heads trained on the first."""
import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = Path(os.environ.get("FSAD_SAMPLE_DATA", REPO.parent / "shared" / "data" / "mvtec_bottle_xs"))


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` (or `cuda(gpus=N)`) are skipped where fewer GPUs are visible, so one
    marker both selects them (`pytest -m cuda`, bench/gpu_check.sh) and skips them on CPU."""
    marked = [(item, item.get_closest_marker("cuda")) for item in items]
    marked = [(item, m) for item, m in marked if m is not None]
    if not marked:
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item, marker in marked:
        need = int(marker.kwargs.get("gpus", 1))
        if have < need:
            item.add_marker(pytest.mark.skip(reason=f"needs {need} CUDA GPU(s), {have} visible"))


def load_test_script():
    """The repository's test.py, imported by path (`import test` may find the stdlib package)."""
    spec = importlib.util.spec_from_file_location("fsad_test_script", REPO / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def datasets(tmp_path_factory):
    from data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    a = generate(root / "aux", ("tiles", "bolt", "fabric"), seed=1, size=96, n_train=4, n_test_good=6, n_test_bad=10)
    b = generate(root / "target", ("candle", "wood_board"), seed=2, size=96, n_train=4, n_test_good=4, n_test_bad=8)
    return a, b


@pytest.fixture(scope="session")
def trained(datasets, tmp_path_factory):
    import train
    from utils.config import MethodConfig, TrainConfig

    out = tmp_path_factory.mktemp("ckpt")
    # 144 steps: enough for the heads and their BatchNorm statistics to settle
    cfg = TrainConfig(data_root=str(datasets[0]), dataset="aux", out_dir=str(out),
                      method=MethodConfig(backbone="tiny_clip"), epochs=24, batch_size=8, train_k_shot=4, seed=0)
    return train.train(cfg)


def recompute_run_metrics(run_dir) -> dict:
    """The per-category metrics of a finished run, recomputed outside test.py's loop from what its
    config.json records (checkpoint, settings, the references it used): a results file that does not
    describe what the checkpoint computes on those references fails against this."""
    import json

    import torch

    from data.dataset import AnomalyDataset, load_image, load_meta
    from methods.base import InferenceOptions
    from methods.checkpoint import load_method
    from utils.metrics import compute_category_metrics

    config = json.loads((Path(run_dir) / "config.json").read_text())
    t = config["test"]
    assert t["eval_size"] > 0, "recompute_run_metrics needs a fixed eval size"
    method, _ = load_method(t["checkpoint"], backbone=t["backbone"], pretrained=t["pretrained"],
                            image_size=t["image_size"])
    method.configure(InferenceOptions(winmode=t["winmode"], win_size=t["win_size"], win_stride=t["win_stride"],
                                      win_weight=t["win_weight"], image_index=t["image_index"]))
    root = Path(t["data_root"])
    meta = load_meta(root)
    out = {}
    for cls, refs in config["references"].items():
        state = method.fit(torch.stack([load_image(root / r, method.image_size) for r in refs]), refs)
        ds = AnomalyDataset(root, "test", method.image_size, items=meta["test"][cls], mask_size=t["eval_size"])
        samples = [ds[i] for i in range(len(ds))]
        maps, raw = method.predict(torch.stack([s["image"] for s in samples]), state, (t["eval_size"],) * 2)
        masks = torch.stack([s["mask"] for s in samples]).numpy() > 0.5
        labels = torch.tensor([s["label"] for s in samples]).numpy()
        out[cls] = compute_category_metrics(labels, method.image_scores(raw, maps).numpy(), masks, maps.numpy(),
                                            fpr_limit=t["fpr_limit"])
    return out
