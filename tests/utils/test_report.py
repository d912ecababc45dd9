"""Run folders, per-run tables and the aggregation over seeds."""
import csv
import io
import json
import math

import pytest

from utils.report import aggregate, is_run_complete, main, run_dir, write_run

NAN = math.nan
BASE = {"i_auroc": 0.5, "i_ap": 0.5, "i_f1max": 0.5, "p_auroc": 0.5, "p_ap": 0.5,
        "p_f1max": 0.5, "p_aupro": 0.5}


def cat(**kw):
    return {**BASE, **kw}


def md_rows(md):
    """First cell -> list of cells of a github table."""
    out = {}
    for line in md.splitlines():
        if line.startswith("|") and not line.startswith("|-"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[cells[0]] = cells
    return out


def csv_rows(text):
    return list(csv.reader(io.StringIO(text)))


def test_run_dir_layout(tmp_path):
    assert run_dir(tmp_path, "clip", "mvtec", 4, 2) == tmp_path / "clip" / "mvtec" / "4shot" / "seed2"
    with pytest.raises(ValueError):
        run_dir(tmp_path, "a/b", "mvtec", 1, 0)


def test_write_run_files_table_and_nan(tmp_path):
    d = run_dir(tmp_path, "m", "mvtec", 1, 0)
    assert not is_run_complete(d)
    per_cat = {"bottle": cat(i_auroc=0.9, p_aupro=0.8), "screw": cat(i_auroc=0.7, p_aupro=NAN)}
    table = write_run(d, {"lr": 1e-3, "model": "m"}, per_cat, extra={"runtime_s": 12.5})
    # atomic writes leave exactly the three files, no temporaries
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "metrics.json", "table.md"]
    assert is_run_complete(d)
    assert (d / "table.md").read_text() == table
    assert json.loads((d / "config.json").read_text()) == {"lr": 1e-3, "model": "m"}

    data = json.loads((d / "metrics.json").read_text())
    assert data["per_category"]["screw"]["p_aupro"] is None  # NaN stored as null
    assert data["mean"]["i_auroc"] == pytest.approx(0.8)
    assert data["mean"]["p_aupro"] == pytest.approx(0.8)  # screw left out
    assert data["excluded"]["p_aupro"] == ["screw"] and data["excluded"]["i_auroc"] == []
    assert data["runtime_s"] == 12.5

    rows = md_rows(table)
    assert rows["category"] == ["category", "i-AUROC", "i-AP", "i-F1max", "p-AUROC",
                                "p-AP", "p-F1max", "p-AUPRO"]
    assert rows["bottle"] == ["bottle", "90.0", "50.0", "50.0", "50.0", "50.0", "50.0", "80.0"]
    assert rows["screw"][-1] == "n/a"
    assert rows["mean"] == ["mean", "80.0", "50.0", "50.0", "50.0", "50.0", "50.0", "80.0"]
    assert "excluded from the mean: p-AUPRO: screw." in table


def test_write_run_note_without_exclusions_and_bad_extra(tmp_path):
    table = write_run(tmp_path / "r", {}, {"a": cat(), "b": cat()})
    assert "every mean is over all 2 categories" in table
    with pytest.raises(ValueError, match="mean"):
        write_run(tmp_path / "r2", {}, {"a": cat()}, extra={"mean": 1})
    assert not is_run_complete(tmp_path / "r2")


def test_is_run_complete_rejects_broken_file(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.json").write_text('{"per_category": {')  # interrupted non-atomic write
    assert not is_run_complete(d)
    (d / "metrics.json").write_text("[]")
    assert not is_run_complete(d)


@pytest.fixture
def results(tmp_path):
    """m1/mvtec: 1-shot x 3 seeds, 2-shot x 1 seed; m2/visa: 1 seed without p_aupro."""
    root = tmp_path / "results"
    bottle_i = [0.90, 0.92, 0.94]
    bottle_pro = [0.7, 0.8, 0.9]
    screw_f1 = [0.6, NAN, NAN]
    for s in range(3):
        write_run(run_dir(root, "m1", "mvtec", 1, s), {"seed": s}, {
            "bottle": cat(i_auroc=bottle_i[s], i_f1max=0.8, p_aupro=bottle_pro[s]),
            "screw": cat(i_auroc=0.8, i_f1max=screw_f1[s], p_aupro=NAN),
        })
    write_run(run_dir(root, "m1", "mvtec", 2, 0), {}, {
        "bottle": cat(i_auroc=0.95), "screw": cat(i_auroc=0.85)})
    no_pro = {k: v for k, v in BASE.items() if k != "p_aupro"}
    write_run(run_dir(root, "m2", "visa", 1, 0), {}, {"candle": no_pro})
    # an interrupted run is ignored, not counted as a seed
    broken = run_dir(root, "m1", "mvtec", 1, 9)
    broken.mkdir(parents=True)
    (broken / "metrics.json").write_text("{")
    return root


def test_aggregate_paper_table(results, capsys):
    written = aggregate(results)
    out = results / "summary"
    assert sorted(p.relative_to(out).as_posix() for p in written) == [
        "comparison.csv", "comparison.html", "comparison.md", "m1/mvtec_1shot.csv", "m1/mvtec_1shot.md", "m1/mvtec_2shot.csv", "m1/mvtec_2shot.md",
        "m1/paper.csv", "m1/paper.md", "m2/paper.csv", "m2/paper.md",
        "m2/visa_1shot.csv", "m2/visa_1shot.md"]
    md = (out / "m1" / "paper.md").read_text()
    assert md in capsys.readouterr().out
    rows = [r for r in md_rows(md).values() if r[0] != "shots"]
    # 1-shot run means: i-AUROC (.90+.80)/2, (.92+.80)/2, (.94+.80)/2 -> 86 ± 1 (ddof=1)
    #                   i-F1max .7, .8, .8 -> 76.67 ± 5.77;  p-AUPRO .7, .8, .9 -> 80 ± 10
    assert rows[0] == ["1", "mvtec", "3", "86.0±1.0", "50.0±0.0", "76.7±5.8", "50.0±0.0",
                       "50.0±0.0", "50.0±0.0", "80.0±10.0"]
    # a single seed shows the value without a std
    assert rows[1] == ["2", "mvtec", "1", "90.0", "50.0", "50.0", "50.0", "50.0", "50.0", "50.0"]
    assert "- 1-shot mvtec: n/a categories left out of the mean: i-F1max: screw; p-AUPRO: screw" in md

    c = csv_rows((out / "m1" / "paper.csv").read_text())
    assert c[0][:6] == ["model", "shots", "dataset", "seeds", "i_auroc_mean", "i_auroc_std"]
    assert c[1] == ["m1", "1", "mvtec", "3", "86.0000", "1.0000", "50.0000", "0.0000",
                    "76.6667", "5.7735", "50.0000", "0.0000", "50.0000", "0.0000",
                    "50.0000", "0.0000", "80.0000", "10.0000"]
    assert c[2][:8] == ["m1", "2", "mvtec", "1", "90.0000", "n/a", "50.0000", "n/a"]

    m2 = md_rows((out / "m2" / "paper.md").read_text())
    assert m2["1"][-1] == "n/a" and m2["1"][3] == "50.0"

    # several models: one table with every model's rows side by side, the same cells as their own
    both = [line.split("|")[1:-1] for line in (out / "comparison.md").read_text().splitlines()
            if line.startswith("| ") and "shots" not in line]
    both = [[c.strip() for c in row] for row in both]
    assert [r[:3] for r in both] == [["1", "mvtec", "m1"], ["1", "visa", "m2"], ["2", "mvtec", "m1"]]
    assert both[0][3:] == rows[0][2:] and both[2][3:] == rows[1][2:]
    one = aggregate(results, model="m1", out=results / "only_m1", echo=False)
    assert one and not any(p.name.startswith("comparison") for p in one)  # one model: nothing to compare


def test_aggregate_per_category_table(results):
    aggregate(results, echo=False)
    md = (results / "summary" / "m1" / "mvtec_1shot.md").read_text()
    assert "(seeds 0, 1, 2)" in md
    rows = md_rows(md)
    assert rows["bottle"] == ["bottle", "3", "92.0±2.0", "50.0±0.0", "80.0±0.0", "50.0±0.0",
                              "50.0±0.0", "50.0±0.0", "80.0±10.0"]
    # screw: i-F1max defined in 1 of 3 seeds, p-AUPRO never
    assert rows["screw"][2] == "80.0±0.0"
    assert rows["screw"][4] == "60.0 (1/3)"
    assert rows["screw"][8] == "n/a"
    assert rows["mean"][2] == "86.0±1.0"
    assert "leaves n/a categories out of each seed's mean: i-F1max: screw; p-AUPRO: screw." in md
    c = csv_rows((results / "summary" / "m1" / "mvtec_1shot.csv").read_text())
    assert [r[0] for r in c] == ["category", "bottle", "screw", "mean"]
    assert c[2][:6] == ["screw", "3", "80.0000", "0.0000", "50.0000", "0.0000"]
    assert c[2][6:8] == ["60.0000", "n/a"] and c[2][-2:] == ["n/a", "n/a"]


def test_cli_model_filter_and_errors(results, tmp_path, capsys):
    out = tmp_path / "summary_m2"
    assert main(["aggregate", str(results), "--model", "m2", "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "m2").iterdir()) == [
        "paper.csv", "paper.md", "visa_1shot.csv", "visa_1shot.md"]
    assert not (out / "m1").exists()
    assert main(["aggregate", str(results), "--model", "nope"]) == 1
    assert main(["aggregate", str(tmp_path / "missing")]) == 2
    assert "no finished run" in capsys.readouterr().err


def test_read_run_metrics_reasons(tmp_path):
    from utils.report import read_run_metrics, scan_runs

    f = tmp_path / "metrics.json"
    cases = {
        '{"per_category": {"a": {"i_auroc": "x"}}}': "per_category['a']['i_auroc'] is 'x', expected a number",
        '{"per_category": {"a": {"p_ap": 1.5}}}': "outside [0, 1]",
        '{"per_category": {"a": 3}}': "per_category['a'] is int",
        '{"per_category": 3}': "no 'per_category' object",
        "{": "not valid JSON",
    }
    for text, reason in cases.items():
        f.write_text(text)
        data, why = read_run_metrics(f)
        assert data is None and reason in why and "\n" not in why, text
    # null and NaN are undefined metrics; a 'mean' that is not an object is recomputed
    f.write_text('{"per_category": {"a": {"i_auroc": null, "p_ap": NaN, "i_f1_threshold": "any"}}, "mean": 0}')
    assert read_run_metrics(f) == (json.loads(f.read_text()), "")
    run = run_dir(tmp_path / "res", "m", "d", 1, 0)
    run.mkdir(parents=True)
    (run / "metrics.json").write_text('{"per_category": {"a": {"i_auroc": [1]}}}')
    skipped = []
    assert scan_runs(tmp_path / "res", skipped=skipped) == []
    assert skipped == [(run / "metrics.json", "per_category['a']['i_auroc'] is [1], expected a number or null")]


def test_aggregate_reports_skipped_runs(results, capsys):
    skipped = []
    aggregate(results, echo=False, skipped=skipped)
    assert [p.parent.name for p, _ in skipped] == ["seed9"]  # the fixture's interrupted run
    assert main(["aggregate", str(results)]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 run(s) whose metrics.json could not be read" in captured.out
    assert f"warning: skipping {results / 'm1' / 'mvtec' / '1shot' / 'seed9' / 'metrics.json'}" in captured.err


def test_run_dir_refuses_a_negative_seed(tmp_path):
    assert run_dir(tmp_path, "m", "d", 2, 0) == tmp_path / "m" / "d" / "2shot" / "seed0"
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        run_dir(tmp_path, "m", "d", 1, -1)


def _config(method, winmode, **test):
    return {"method": {"method": method, "backbones": {"backbone": {"config": "tiny_clip"}}, "use_nam": True},
            "test": {"winmode": winmode, "win_size": 8, "win_stride": 2, "win_weight": 0.5, "image_index": "windows",
                     "eval_size": 240, "precision": "fp32", **test}}


def test_comparison_with_one_model_and_its_page_rows(tmp_path):
    """Without --model the comparison is written also for one model (the demo's case); its page rows
    name the method, the backbone and the settings that tell rows apart, and link each seed's
    report.html where one exists."""
    from utils.report import RUN_PAGE, comparison_rows, scan_runs, write_run_page

    root = tmp_path / "results"
    for seed in (0, 1):
        write_run(run_dir(root, "a", "visa", 1, seed), _config("fdsl", "mul"), {"candle": cat(i_auroc=0.8 + seed / 10)})
    written = aggregate(root, echo=False)
    assert {p.name for p in written} >= {"comparison.md", "comparison.csv", "comparison.html"}
    assert "| a " in (root / "summary" / "comparison.md").read_text()

    write_run(run_dir(root, "b", "visa", 1, 0), _config("knn", "nan"), {"candle": cat(i_auroc=0.7)})
    page = write_run_page(run_dir(root, "a", "visa", 1, 1))
    assert page.name == RUN_PAGE and "85.0" not in page.read_text() and "90.0" in page.read_text()
    out = root / "summary"
    rows = comparison_rows(scan_runs(root), root, out)
    assert [(r["model"], r["seeds"]) for r in rows] == [("a", 2), ("b", 1)]
    assert rows[0]["cells"]["i_auroc"][0] == "85.0±7.1" and rows[0]["cells"]["i_auroc"][1] == pytest.approx(85.0)
    assert rows[0]["reports"] == [("seed1", "../a/visa/1shot/seed1/report.html")]  # seed0 has no page
    assert rows[1]["reports"] == []
    # nan ignores the window settings: only what differs and applies is named
    assert rows[0]["facts"] == {"method": "fdsl", "backbone": "tiny_clip",
                                "settings": "winmode=mul win_size=8 win_stride=2 win_weight=0.5 image_index=windows"}
    assert rows[1]["facts"] == {"method": "knn", "backbone": "tiny_clip", "settings": "winmode=nan image_index=off"}


def test_run_page_shows_only_the_pictures_this_run_drew(tmp_path):
    """Curves and panels on disk appear in report.html when the run's config says it drew them
    (--save-images), not when they are left over from an earlier run of the folder."""
    from PIL import Image

    from utils.report import PANELS_INDEX, write_run_page

    d = run_dir(tmp_path, "m", "visa", 1, 0)
    (d / "curves").mkdir(parents=True)
    (d / "images" / "candle").mkdir(parents=True)
    for kind in ("roc", "pr", "pro"):
        Image.new("RGB", (4, 4)).save(d / "curves" / f"candle_{kind}.png")
    Image.new("RGB", (4, 4)).save(d / "images" / "candle" / "good_000.png")
    (d / "images" / "candle" / PANELS_INDEX).write_text(json.dumps([
        {"panel": "images/candle/good_000.png", "image": "candle/test/good/000.png", "label": "normal", "score": 0.9},
        {"panel": "images/candle/gone.png", "image": "x.png", "label": "anomalous", "score": 0.1}]))  # file missing
    write_run(d, {"test": {"save_images": 0}}, {"candle": cat()})
    assert "<img" not in write_run_page(d).read_text()
    write_run(d, {"test": {"save_images": 1}}, {"candle": cat()})
    html = write_run_page(d).read_text()
    assert html.count("<img") == 4 and "candle_pro.png" in html and "good_000.png" in html and "gone.png" not in html
