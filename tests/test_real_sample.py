"""The real MVTec AD sample (../shared/data/mvtec_bottle_xs): indexing and a k-shot test run on the
original 900x900 images and masks. Skipped where the folder is absent."""
import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, SAMPLE_DATA, load_test_script
from utils.config import TestConfig

pytestmark = pytest.mark.skipif(not (SAMPLE_DATA / "bottle").is_dir(), reason=f"sample data not found at {SAMPLE_DATA}")


@pytest.fixture(scope="module")
def bottle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bottle_xs")
    shutil.copytree(SAMPLE_DATA / "bottle", root / "bottle")
    done = subprocess.run([sys.executable, str(REPO / "data" / "mvtec.py"), "--root", str(root)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return root


def test_meta_counts(bottle):
    meta = json.loads((bottle / "meta.json").read_text())
    assert len(meta["train"]["bottle"]) == 5
    test = meta["test"]["bottle"]
    assert len(test) == 10 and sum(it["anomaly"] for it in test) == 5
    assert all(it["mask_path"].startswith("bottle/ground_truth/broken_large/") for it in test if it["anomaly"])


@pytest.mark.slow
@pytest.mark.parametrize("eval_size", [240, 0])
def test_k_shot_run_on_real_images(bottle, trained, tmp_path, eval_size):
    cfg = TestConfig(data_root=str(bottle), dataset="bottle_xs", checkpoint=str(trained), results_root=str(tmp_path),
                     k_shot=2, seed=0, eval_size=eval_size)
    run = load_test_script().evaluate(cfg)
    metrics = json.loads((run / "metrics.json").read_text())["per_category"]["bottle"]
    for key in ("i_auroc", "i_ap", "i_f1max", "p_auroc", "p_ap", "p_f1max", "p_aupro"):
        assert 0.0 <= metrics[key] <= 1.0, key
    print(f"\nbottle_xs eval_size={eval_size}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
