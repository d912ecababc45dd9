"""bench/gpu_report.py: each target reads the figure it names, at the precision and k it names,
passes on its boundary and fails just past it; a part that failed gives n/a with its error; the
Markdown report prints every part, every target row and the errors."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from gpu_report import TARGETS, evaluate_targets, render_markdown  # noqa: E402

GB = 1e9


def pipeline_rows(method="fdsl", whole=(150.0, 120.0, 100.0), lfe=(12.0, 11.0, 10.0), x_floor=(1.5, 1.9, 2.0),
                  memory_4shot=23.9 * GB):
    rows = [{"method": method, "precision": "fp16", "mode": "all", "skipped": "fp16 runs on CUDA only"}]
    for k, ips in zip((1, 2, 4), whole):
        rows.append({"method": method, "precision": "bf16", "mode": "nan", "k": k, "loop_images_per_s": ips,
                     "images_per_s": ips / 2, "peak_bytes": 1.0, "peak_total_bytes": 2 * GB, "p_auroc": 0.9})
    for k, ips, xf in zip((1, 2, 4), lfe, x_floor):
        rows.append({"method": method, "precision": "bf16", "mode": "mul", "k": k, "loop_images_per_s": ips,
                     "images_per_s": ips / 2, "peak_bytes": 1.0, "x_floor": xf, "floor_images_per_s": ips * xf,
                     "peak_total_bytes": memory_4shot if k == 4 else 5 * GB, "p_auroc": 0.9})
    # fp32 is slower and larger: it must not decide any target
    rows += [{"method": method, "precision": "fp32", "mode": m, "k": k, "loop_images_per_s": 1.0, "images_per_s": 1.0,
              "peak_bytes": 1.0, "peak_total_bytes": 60 * GB, "x_floor": 9.0, "p_auroc": 0.9}
             for m in ("nan", "mul") for k in (1, 2, 4)]
    rows.append({"method": method, "precision": "fp32", "mode": "mul", "k": 4, "error": "OutOfMemoryError: x"})
    return {"status": "partial", "seconds": 10.0, "cap_s": 100.0, "figures": {"setup": "fdsl at 518 px"},
            "rows": rows, "notes": [], "error": "1 row(s) failed, first: OutOfMemoryError: x"}


def precision_part(max_diff=0.01, auroc_diff=-0.3):
    rows = [{"method": "knn", "mode": "nan", "precision": "bf16", "max_abs_diff": max_diff, "mean_abs_diff": 1e-4,
             "p_auroc_fp32": 80.0, "p_auroc": 80.0 + auroc_diff, "p_auroc_diff": auroc_diff},
            {"method": "knn", "mode": "nan", "precision": "fp16", "max_abs_diff": 0.5, "mean_abs_diff": 0.1,
             "p_auroc_fp32": 80.0, "p_auroc": 70.0, "p_auroc_diff": -10.0}]
    return {"status": "ok", "seconds": 5.0, "cap_s": 100.0, "figures": {}, "rows": rows, "notes": []}


def cuda_part(passed=12, failed=0, errors=0, skipped=2):
    return {"status": "ok", "seconds": 5.0, "cap_s": 100.0, "rows": [], "notes": [],
            "figures": {"tests": passed + failed + errors + skipped, "passed": passed, "failed": failed,
                        "errors": errors, "skipped": skipped, "exit_code": int(bool(failed or errors))}}


def by_key(targets):
    return {(t["target"], t["subject"]): t for t in targets}


def test_targets_pass_on_their_boundaries_and_read_the_bf16_rows():
    t = by_key(evaluate_targets({"pipeline:fdsl": pipeline_rows(), "precision": precision_part(),
                                 "cuda_tests": cuda_part()}))
    assert t[("whole_ips", "fdsl whole image")]["result"] == "PASS"  # worst k: exactly 100
    assert t[("whole_ips", "fdsl whole image")]["value"] == 100.0
    assert t[("whole_ips", "fdsl whole image")]["detail"] == "k=4"
    assert t[("lfe_ips", "fdsl LFE mul")]["result"] == "PASS" and t[("lfe_ips", "fdsl LFE mul")]["value"] == 10.0
    assert t[("lfe_floor", "fdsl LFE mul")]["result"] == "PASS" and t[("lfe_floor", "fdsl LFE mul")]["value"] == 2.0
    mem = t[("lfe_4shot_memory", "fdsl LFE mul k=4")]
    assert mem["result"] == "PASS" and mem["value"] == pytest.approx(23.9)
    assert t[("maps_max_diff", "knn nan")]["result"] == "PASS"
    assert t[("auroc_diff", "knn nan")]["result"] == "PASS"  # -0.3 points: on the boundary
    assert t[("cuda_tests", "pytest -m cuda")]["result"] == "PASS"
    assert all(k[0] in TARGETS for k in t)


def test_targets_fail_just_past_their_boundaries():
    t = by_key(evaluate_targets({"pipeline:fdsl": pipeline_rows(whole=(150.0, 99.9, 120.0), lfe=(12.0, 9.99, 11.0),
                                                               x_floor=(1.5, 2.01, 1.0), memory_4shot=24 * GB),
                                 "precision": precision_part(max_diff=0.0101, auroc_diff=0.31),
                                 "cuda_tests": cuda_part(failed=1)}))
    whole = t[("whole_ips", "fdsl whole image")]
    assert whole["result"] == "FAIL" and whole["value"] == 99.9 and whole["detail"] == "k=2"
    assert t[("lfe_ips", "fdsl LFE mul")]["result"] == "FAIL"
    assert t[("lfe_floor", "fdsl LFE mul")]["result"] == "FAIL" and t[("lfe_floor", "fdsl LFE mul")]["detail"] == "k=2"
    assert t[("lfe_4shot_memory", "fdsl LFE mul k=4")]["result"] == "FAIL"
    assert t[("maps_max_diff", "knn nan")]["result"] == "FAIL"
    assert t[("auroc_diff", "knn nan")]["result"] == "FAIL"
    assert t[("cuda_tests", "pytest -m cuda")]["result"] == "FAIL"
    # no test passed (all skipped: a machine without a GPU) is not green either; AUROC lost counts too
    t = by_key(evaluate_targets({"cuda_tests": cuda_part(passed=0, skipped=15),
                                 "precision": precision_part(auroc_diff=-0.31)}))
    assert t[("cuda_tests", "pytest -m cuda")]["result"] == "FAIL"
    assert t[("auroc_diff", "knn nan")]["result"] == "FAIL"


def test_a_failed_part_gives_not_measured_with_its_error():
    failed = {"status": "timeout", "seconds": 120.0, "cap_s": 120.0, "figures": {}, "rows": [], "notes": [],
              "error": "cut off at its 120 s cap"}
    t = by_key(evaluate_targets({"pipeline:knn": failed, "precision": {**failed, "status": "failed",
                                                                       "error": "RuntimeError: boom"}}))
    for key in (("whole_ips", "knn whole image"), ("lfe_ips", "knn LFE mul"), ("lfe_floor", "knn LFE mul"),
                ("lfe_4shot_memory", "knn LFE mul k=4")):
        assert t[key]["result"] == "n/a" and t[key]["value"] is None
        assert "cut off at its 120 s cap" in t[key]["detail"]
    assert t[("maps_max_diff", "bf16 maps")]["result"] == "n/a"
    assert "RuntimeError: boom" in t[("maps_max_diff", "bf16 maps")]["detail"]
    assert evaluate_targets({}) == []  # nothing run, nothing claimed


def test_markdown_prints_every_part_target_and_error():
    parts = {"machine": {"status": "ok", "seconds": 1.0, "cap_s": 60.0, "rows": [], "notes": [],
                         "figures": {"gpu0": "NVIDIA H100", "missing_packages": ["open_clip_torch (import open_clip: "
                                                                                 "No module named 'open_clip')"]}},
             "pipeline:fdsl": pipeline_rows(), "precision": precision_part(), "cuda_tests": cuda_part(),
             "train": {"status": "failed", "seconds": 2.0, "cap_s": 90.0, "figures": {}, "rows": [], "notes": [],
                       "error": "RuntimeError: injected failure (--inject-fail)"}}
    report = {"command": "bash bench/gpu_check.sh out", "parts": parts, "targets": evaluate_targets(parts),
              "budget_s": 470, "seconds": 30.0, "exit_code": 1}
    md = render_markdown(report)
    for name in parts:
        assert f"### {name}" in md
    assert "RuntimeError: injected failure (--inject-fail)" in md
    assert "open_clip_torch" in md and "NVIDIA H100" in md
    table = md.split("## Targets")[1].split("## Parts")[0]
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + len(report["targets"])
    assert "| PASS |" in table
    assert "OutOfMemoryError: x" in md  # a failed row keeps its error in the part's table


def test_on_cuda_the_memory_target_reads_the_allocators_reserve():
    part = pipeline_rows(memory_4shot=20 * GB)
    for r in part["rows"]:
        if r.get("precision") == "bf16" and r.get("mode") == "mul" and r.get("k") == 4:
            r["peak_reserved_bytes"] = 24.5 * GB  # allocated 20 GB fits, the allocator's reserve does not
    mem = by_key(evaluate_targets({"pipeline:fdsl": part}))[("lfe_4shot_memory", "fdsl LFE mul k=4")]
    assert mem["result"] == "FAIL" and mem["value"] == pytest.approx(24.5)
    assert "reserve" in mem["figure"] and "allocated 20.00 GB" in mem["detail"]


def test_every_markdown_table_row_has_its_headers_cell_count():
    """Rows of errors and skips (a precision that runs on CUDA only, an out-of-memory row) fill
    the same columns as measured rows: a longer row would shift or drop cells in a renderer."""
    parts = {"pipeline:fdsl": pipeline_rows(), "precision": {**precision_part(), "rows": precision_part()["rows"] + [
                 {"method": "fdsl", "mode": "mul", "precision": "-", "error": "RuntimeError: x"}]},
             "cuda_tests": {**cuda_part(), "rows": [{"test": "t::a", "outcome": "passed", "message": ""}]},
             "train": {"status": "partial", "seconds": 2.0, "cap_s": 90.0, "figures": {}, "notes": [], "rows": [
                 {"method": "fdsl", "precision": "bf16", "batch": 8, "s_per_step": 0.5, "images_per_s": 16.0,
                  "peak_total_bytes": GB, "peak_reserved_bytes": 2 * GB, "peak_bytes": GB, "loss": 0.7},
                 {"method": "dcpsfr", "precision": "bf16", "error": "OutOfMemoryError: y"}]},
             "torchrun": {"status": "partial", "seconds": 2.0, "cap_s": 90.0, "figures": {}, "notes": [], "rows": [
                 {"processes": 1, "seconds": 3.0}, {"processes": 2, "error": "exit code 1: z"}]}}
    md = render_markdown({"command": "x", "parts": parts, "targets": evaluate_targets(parts), "budget_s": 470,
                          "seconds": 1.0, "exit_code": 1})
    tables, current = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    assert len(tables) == 7  # targets, parts, and one per part
    for table in tables:
        cells = [len(line.replace("\\|", "").strip("|").split("|")) for line in table]
        assert len(set(cells)) == 1, table
