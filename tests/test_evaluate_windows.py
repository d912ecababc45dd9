"""test.py's window branch end to end (tiny CLIP, generated data): `mul` is the blend of the `nan`
and `onlywin` runs for maps and raw scores, the final image score is taken on the blended map, and
image_index=all changes the whole-image pass."""
import json

import pytest
import torch

from conftest import load_test_script
from models.scoring import final_image_scores
from utils.config import TestConfig
from utils.metrics import compute_category_metrics

W = 0.3  # window weight: not 0.5, so swapped weights would show


def run(cfg_kwargs, datasets, trained, tmp_path, monkeypatch):
    """Evaluate one configuration; returns (what compute_category_metrics received, metrics.json)."""
    test_script = load_test_script()
    seen = {}

    def spy(labels, scores, masks, maps, **kw):
        seen.update(labels=labels, scores=torch.from_numpy(scores.copy()), masks=masks, maps=torch.from_numpy(maps.copy()))
        return compute_category_metrics(labels, scores, masks, maps, **kw)
    monkeypatch.setattr(test_script, "compute_category_metrics", spy)
    name = "_".join(f"{v}" for v in cfg_kwargs.values())
    cfg = TestConfig(data_root=str(datasets[1]), dataset="target", checkpoint=str(trained), results_root=str(tmp_path),
                     model_name=name, classes=["candle"], k_shot=2, seed=1, win_size=8, win_stride=4, win_weight=W,
                     eval_size=64, **cfg_kwargs)
    run_dir = test_script.evaluate(cfg)
    return seen, json.loads((run_dir / "metrics.json").read_text())["per_category"]["candle"]


def raw_scores(seen):
    """The raw (head) scores back from the final ones: final = 0.5 * (raw + normalised map maximum)."""
    return 2 * seen["scores"] - 2 * final_image_scores(torch.zeros(len(seen["scores"])), seen["maps"].flatten(1).amax(1))


@pytest.mark.slow
def test_mul_blends_nan_and_onlywin_and_scores_the_blended_map(datasets, trained, tmp_path, monkeypatch):
    nan, m_nan = run({"winmode": "nan"}, datasets, trained, tmp_path, monkeypatch)
    win, _ = run({"winmode": "onlywin"}, datasets, trained, tmp_path, monkeypatch)
    mul, m_mul = run({"winmode": "mul"}, datasets, trained, tmp_path, monkeypatch)
    assert (nan["maps"] - win["maps"]).abs().max() > 1e-3  # the windows see something else
    torch.testing.assert_close(mul["maps"], (1 - W) * nan["maps"] + W * win["maps"], atol=1e-6, rtol=0)
    raw_mul = (1 - W) * raw_scores(nan) + W * raw_scores(win)
    # the final score normalises the maximum of the blended map, not of either part
    expected = final_image_scores(raw_mul, mul["maps"].flatten(1).amax(1))
    torch.testing.assert_close(mul["scores"], expected.float(), atol=1e-6, rtol=0)
    assert not torch.allclose(expected, final_image_scores(raw_mul, nan["maps"].flatten(1).amax(1)), atol=1e-4)
    # metrics.json holds the metrics of exactly these maps and scores
    again = compute_category_metrics(mul["labels"], mul["scores"].numpy(), mul["masks"], mul["maps"].numpy())
    assert m_mul["i_auroc"] == pytest.approx(again["i_auroc"]) and m_mul["p_auroc"] == pytest.approx(again["p_auroc"])
    assert m_nan["p_auroc"] != m_mul["p_auroc"]

    # image_index=all: the whole-image pass matches against the most similar reference only (k=2)
    nan_all, _ = run({"winmode": "nan", "image_index": "all"}, datasets, trained, tmp_path, monkeypatch)
    mul_all, _ = run({"winmode": "mul", "image_index": "all"}, datasets, trained, tmp_path, monkeypatch)
    assert (nan_all["maps"] - nan["maps"]).abs().max() > 1e-4
    torch.testing.assert_close(mul_all["maps"], (1 - W) * nan_all["maps"] + W * win["maps"], atol=1e-6, rtol=0)
