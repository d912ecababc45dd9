"""bench/gpu_check.sh on the CPU: the dry run goes through every part (same code as on a GPU,
tiny backbones) and writes both report files with every part's figures; a part that fails or
outlives its cap is reported with its one-line error while the others still run; without CUDA
a real run stops with one line and exit code 3; bad arguments are refused."""
from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from methods import METHODS, list_methods

REPO = Path(__file__).resolve().parents[2]
# generous caps: the point is the structure, and a loaded 2-core machine is slow
ROOMY = ["--budget", "3000", "--cap", "machine=300", "--cap", "cuda_tests=400", "--cap", "pipeline=600",
         "--cap", "precision=600", "--cap", "train=400", "--cap", "torchrun=400"]
# methods that refuse LFE windows (methods/base.py): their pipeline part times whole images only
WHOLE_IMAGE_ONLY = {"dcpsfr", "subspacead"}


def gpu_check(*args: str, timeout: float = 3000) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_CHECK_WHEELS": "none"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    return subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def read(out: Path) -> tuple[dict, str]:
    return json.loads((out / "gpu_report.json").read_text()), (out / "gpu_report.md").read_text()


def positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


@pytest.mark.slow
def test_dry_run_writes_every_part_with_its_figures(tmp_path):
    out = tmp_path / "report"
    res = gpu_check("--dry-run", str(out), *ROOMY)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report, md = read(out)
    methods = list_methods()
    parts = report["parts"]
    assert list(parts) == (["machine", "cuda_tests"] + [f"pipeline:{m}" for m in ("fdsl", "knn")]
                           + [f"pipeline:{m}" for m in sorted(set(methods) - {"fdsl", "knn"})]
                           + ["precision", "train", "torchrun"])
    for name, part in parts.items():
        assert part["status"] == "ok", (name, part.get("error"))
        assert part["figures"] or part["rows"], name
        assert f"### {name}" in md
    assert report["dry_run"] is True and report["exit_code"] == 0

    machine = parts["machine"]["figures"]
    assert machine["cuda_available"] is torch.cuda.is_available() and machine["missing_packages"] == []
    assert [m["name"] for m in machine["methods"]] == ["fdsl", "knn"] + sorted(set(methods) - {"fdsl", "knn"})
    assert set(machine["matmul_tflops"]) == {"fp32", "bf16"}  # fp16: CUDA only

    cuda = parts["cuda_tests"]["figures"]
    assert cuda["tests"] >= 1 and cuda["failed"] == cuda["errors"] == 0
    assert cuda["skipped"] == cuda["tests"]  # a CPU machine

    shots = report["settings"]["shots"]
    for m in methods:
        rows = parts[f"pipeline:{m}"]["rows"]
        assert {(r["precision"], r.get("skipped")) for r in rows if "skipped" in r} == {("fp16", "fp16 runs on CUDA only")}
        modes = parts[f"pipeline:{m}"]["figures"]["modes"]
        assert modes == (["nan"] if m in WHOLE_IMAGE_ONLY else ["nan", "mul"])
        for prec in ("bf16", "fp32"):
            for mode in modes:
                got = {r["k"]: r for r in rows if r["precision"] == prec and r["mode"] == mode}
                assert sorted(got) == shots, (m, prec, mode)
                for r in got.values():
                    assert all(positive(r[key]) for key in ("loop_images_per_s", "images_per_s", "peak_total_bytes",
                                                            "floor_images_per_s", "x_floor")), r
                    assert 0 <= r["p_auroc"] <= 1
        assert all(v["whole_gflop"] > 0 for v in parts[f"pipeline:{m}"]["figures"]["flops"].values())

    precision = parts["precision"]["rows"]
    for m in methods:
        for mode in (["nan"] if m in WHOLE_IMAGE_ONLY else ["nan", "mul"]):
            r = next(r for r in precision if r["method"] == m and r["mode"] == mode)
            assert r["precision"] == "bf16" and 0 <= r["mean_abs_diff"] <= r["max_abs_diff"] < 1
            assert abs(r["p_auroc_diff"]) < 5

    train = parts["train"]["rows"]
    assert [r["method"] for r in train] == [m for m in ("fdsl", "knn", *sorted(set(methods) - {"fdsl", "knn"}))
                                            if m in methods and METHODS[m].trainable]
    assert all(r["finite"] and positive(r["s_per_step"]) and r["precision"] == "bf16" for r in train)

    runs = {r["processes"]: r for r in parts["torchrun"]["rows"]}
    assert sorted(runs) == [1, 2] and runs[2]["metrics_equal"] == "yes" and positive(runs[2]["speedup"])

    # every target with its figure and a mark; the Markdown table holds the same rows
    targets = report["targets"]
    assert {t["target"] for t in targets} == {"whole_ips", "lfe_ips", "lfe_floor", "lfe_4shot_memory",
                                              "maps_max_diff", "auroc_diff", "cuda_tests"}
    assert all(t["result"] in ("PASS", "FAIL") and t["value"] is not None for t in targets)
    assert "**Dry run**" in md and "## Targets" in md
    assert res.stdout.count("target ") == len(targets)


def test_a_failing_and_a_hanging_part_are_reported_and_the_next_part_still_runs(tmp_path):
    out = tmp_path / "report"
    res = gpu_check("--dry-run", str(out), "--parts", "cuda_tests,precision,train", "--inject-fail", "cuda_tests",
                    "--inject-hang", "precision", "--cap", "precision=6", *ROOMY[:2], "--cap", "machine=300",
                    "--cap", "train=400")
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    report, md = read(out)
    parts = report["parts"]
    assert list(parts) == ["machine", "cuda_tests", "precision", "train"]
    assert parts["cuda_tests"]["status"] == "failed"
    assert parts["cuda_tests"]["error"] == "RuntimeError: injected failure (--inject-fail)"
    hung = parts["precision"]
    assert hung["status"] == "timeout" and hung["error"] == "cut off at its 6 s cap"
    assert hung["seconds"] < 6 + 30  # killed, not waited for
    assert parts["train"]["status"] == "ok" and parts["train"]["rows"]  # the run went on
    assert all(positive(r["s_per_step"]) for r in parts["train"]["rows"])
    assert "RuntimeError: injected failure (--inject-fail)" in md and "cut off at its 6 s cap" in md
    assert report["exit_code"] == 1
    # the failed and the cut-off part leave their targets not measured, naming why
    na = [t for t in report["targets"] if t["result"] == "n/a"]
    assert {t["target"] for t in na} == {"cuda_tests", "maps_max_diff", "auroc_diff"}
    assert all("cut off" in t["detail"] or "injected failure" in t["detail"] for t in na)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_cuda_a_real_run_says_so_in_one_line_and_exits_3(tmp_path):
    out = tmp_path / "report"
    res = gpu_check(str(out), "--cap", "machine=300")
    assert res.returncode == 3, res.stdout[-3000:] + res.stderr[-3000:]
    report, md = read(out)
    assert report["exit_code"] == 3 and "sees no CUDA GPU" in report["stopped"]
    assert report["parts"]["machine"]["status"] == "ok"
    assert all(p["status"] == "not run" for n, p in report["parts"].items() if n != "machine")
    assert "pipeline:fdsl" in report["parts"] and "torchrun" in report["parts"]
    assert "**stopped:** torch" in md and "sees no CUDA GPU" in res.stdout


@pytest.mark.parametrize("args, message", [
    (["--cap", "pipeline=abc"], "--cap 'pipeline=abc': expected PART=SECONDS"),
    (["--cap", "nothing=3"], "--cap 'nothing=3'"),
    (["--parts", "machine,benchmarks"], "--parts: unknown part 'benchmarks'"),
    (["--budget", "0"], "--budget must be > 0"),
])
def test_bad_arguments_are_refused_with_one_line(tmp_path, args, message):
    res = gpu_check("--dry-run", str(tmp_path / "report"), *args, timeout=120)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert not (tmp_path / "report" / "gpu_report.json").exists()


def test_an_output_folder_that_cannot_be_written_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = gpu_check("--dry-run", str(blocker / "report"), timeout=120)
    assert res.returncode == 2 and "report folder" in res.stderr and str(blocker) in res.stderr, res.stderr


def test_a_run_stopped_from_outside_kills_its_part_and_says_so(tmp_path):
    import signal
    import time

    out = tmp_path / "report"
    env = {**os.environ, "GPU_CHECK_WHEELS": "none"}
    proc = subprocess.Popen(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", str(out), "--parts",
                             "cuda_tests", "--inject-hang", "cuda_tests", "--cap", "cuda_tests=600", "--cap",
                             "machine=300"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pid, deadline = None, time.monotonic() + 600
    while pid is None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        try:
            pid = json.loads((out / "gpu_report.json").read_text())["parts"]["cuda_tests"].get("pid")
        except (OSError, ValueError, KeyError):
            pass
    assert pid is not None, proc.communicate()
    proc.send_signal(signal.SIGTERM)  # to the script: its exec'd Python gets it
    proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    report, md = read(out)
    assert report["exit_code"] == 128 + signal.SIGTERM and report["stopped"].startswith("stopped by SIGTERM")
    assert report["parts"]["cuda_tests"]["status"] == "failed"
    assert report["parts"]["cuda_tests"]["error"] == "the run was stopped (SIGTERM)"
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:  # the hung part is gone too
        time.sleep(0.2)
    assert not Path(f"/proc/{pid}").exists()
