"""Shared fixtures: two small synthetic datasets (aux -> target) and heads trained on the first."""
import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = Path(os.environ.get("FSAD_SAMPLE_DATA", REPO.parent / "shared" / "data" / "mvtec_bottle_xs"))


def load_test_script():
    """The repository's test.py, imported by path (`import test` may find the stdlib package)."""
    spec = importlib.util.spec_from_file_location("fdsl_test_script", REPO / "test.py")
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
