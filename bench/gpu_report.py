"""The targets of bench/gpu_check.py and its report: pure functions over the parts' results
(no torch), so the report is written even where torch does not import.

A result is the dict gpu_check.py keeps per part: {"status", "seconds", "cap_s", "error",
"figures", "rows", "notes"}; `evaluate_targets` reads the figures the targets name and
`render_markdown` prints every figure with its target and a pass/fail mark beside it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

GB = 1e9
MiB = 2 ** 20

# The methods the speed and memory targets are about (ViT-L/14-336 at 518 px); other methods in
# the registry are measured and printed, without a target.
TARGET_METHODS = ("fdsl", "knn")


@dataclass(frozen=True)
class Target:
    key: str
    text: str  # what the report prints in its target column
    passes: Callable[[float], bool]


TARGETS = {
    "whole_ips": Target("whole_ips", ">= 100 img/s (bf16)", lambda v: v >= 100.0),
    "lfe_ips": Target("lfe_ips", ">= 10 img/s (bf16)", lambda v: v >= 10.0),
    "lfe_floor": Target("lfe_floor", "<= 2x the FLOP floor (bf16)", lambda v: v <= 2.0),
    "lfe_4shot_memory": Target("lfe_4shot_memory", "< 24 GB", lambda v: v < 24.0),
    "maps_max_diff": Target("maps_max_diff", "max |bf16 - fp32| <= 1e-2", lambda v: v <= 1e-2),
    "auroc_diff": Target("auroc_diff", "|pixel AUROC bf16 - fp32| <= 0.3 points", lambda v: abs(v) <= 0.3),
    "cuda_tests": Target("cuda_tests", "no failure, >= 1 passed", lambda v: v == 1.0),
}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _row(target: Target, subject: str, figure: str, value, detail: str = "") -> dict:
    if not _finite(value):
        return {"target": target.key, "subject": subject, "figure": figure, "value": None, "goal": target.text,
                "result": "n/a", "detail": detail or "not measured"}
    return {"target": target.key, "subject": subject, "figure": figure, "value": float(value), "goal": target.text,
            "result": "PASS" if target.passes(float(value)) else "FAIL", "detail": detail}


def _missing(target: Target, subject: str, figure: str, why: str) -> dict:
    return _row(target, subject, figure, None, why)


def _part_why(part: dict | None) -> str:
    if part is None:
        return "part not run"
    if part.get("error"):
        return f"{part.get('status')}: {part['error']}"
    return f"part {part.get('status')}, no such row"


def _pipeline_rows(part: dict, precision: str, mode: str) -> list[dict]:
    return [r for r in part.get("rows", []) if r.get("precision") == precision and r.get("mode") == mode
            and "error" not in r and "skipped" not in r]


def evaluate_targets(parts: dict[str, dict]) -> list[dict]:
    """One row per target and subject: the figure, the goal and PASS / FAIL / n/a (with why)."""
    out = []
    for method in TARGET_METHODS:
        part = parts.get(f"pipeline:{method}")
        if part is None:
            continue
        why = _part_why(part)
        for mode, target, what in (("nan", "whole_ips", "whole image"), ("mul", "lfe_ips", "LFE mul")):
            rows, t = _pipeline_rows(part, "bf16", mode), TARGETS[target]
            if rows:
                worst = min(rows, key=lambda r: r["loop_images_per_s"])
                out.append(_row(t, f"{method} {what}", "test loop img/s, worst of k", worst["loop_images_per_s"],
                                f"k={worst['k']}"))
            else:
                out.append(_missing(t, f"{method} {what}", "test loop img/s", why))
        lfe = _pipeline_rows(part, "bf16", "mul")
        t = TARGETS["lfe_floor"]
        floored = [r for r in lfe if _finite(r.get("x_floor"))]
        if floored:
            worst = max(floored, key=lambda r: r["x_floor"])
            out.append(_row(t, f"{method} LFE mul", "time / floor time, worst of k", worst["x_floor"],
                            f"k={worst['k']}"))
        else:
            out.append(_missing(t, f"{method} LFE mul", "time / floor time", why if not lfe else "no FLOP floor"))
        t = TARGETS["lfe_4shot_memory"]
        four = [r for r in lfe if r.get("k") == 4]
        if four and _finite(four[0].get("peak_reserved_bytes")):  # CUDA: what the card must hold
            out.append(_row(t, f"{method} LFE mul k=4", "peak GPU memory GB (caching allocator's reserve)",
                            four[0]["peak_reserved_bytes"] / GB,
                            f"allocated {four[0]['peak_total_bytes'] / GB:.2f} GB"))
        elif four:
            out.append(_row(t, f"{method} LFE mul k=4", "peak memory GB (all allocations)",
                            four[0]["peak_total_bytes"] / GB, four[0].get("mem_what", "")))
        else:
            out.append(_missing(t, f"{method} LFE mul k=4", "peak memory GB", why))

    part = parts.get("precision")
    if part is not None:
        rows = [r for r in part.get("rows", []) if r.get("precision") == "bf16" and "error" not in r]
        if not rows:
            out.append(_missing(TARGETS["maps_max_diff"], "bf16 maps", "max |diff|", _part_why(part)))
            out.append(_missing(TARGETS["auroc_diff"], "bf16 maps", "pixel AUROC difference", _part_why(part)))
        for r in rows:
            subject = f"{r['method']} {r['mode']}"
            out.append(_row(TARGETS["maps_max_diff"], subject, "max |diff| of the maps", r.get("max_abs_diff"),
                            f"mean {r['mean_abs_diff']:.2e}" if _finite(r.get("mean_abs_diff")) else ""))
            out.append(_row(TARGETS["auroc_diff"], subject, "pixel AUROC difference, points", r.get("p_auroc_diff"),
                            f"fp32 {r['p_auroc_fp32']:.2f}" if _finite(r.get("p_auroc_fp32")) else ""))

    part = parts.get("cuda_tests")
    if part is not None:
        f = part.get("figures", {})
        t = TARGETS["cuda_tests"]
        if "passed" in f:
            green = float(f.get("failed", 0) == 0 and f.get("errors", 0) == 0 and f.get("passed", 0) >= 1)
            out.append(_row(t, "pytest -m cuda", "passed / failed / errors / skipped", green,
                            f"{f.get('passed', 0)} / {f.get('failed', 0)} / {f.get('errors', 0)} / "
                            f"{f.get('skipped', 0)}"))
        else:
            out.append(_missing(t, "pytest -m cuda", "passed / failed", _part_why(part)))
    return out


# -- Markdown ---------------------------------------------------------------------------------

def _fmt(v, spec: str = ".2f", none: str = "-") -> str:
    if v is None:
        return none
    if isinstance(v, float) and not math.isfinite(v):
        return "nan"
    if isinstance(v, (int, float)):
        return format(v, spec)
    return str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |" for r in rows]
    return lines + [""]


def _part_header(name: str, part: dict) -> list[str]:
    line = f"_{part.get('status', '?')}, {_fmt(part.get('seconds'), '.1f')} s of a {_fmt(part.get('cap_s'), '.0f')} s cap_"
    out = [f"### {name}", "", line, ""]
    if part.get("figures", {}).get("setup"):
        out += [part["figures"]["setup"], ""]
    if part.get("error"):
        out += [f"**error:** `{part['error']}`", ""]
    for n in part.get("notes", []):
        out += [f"- {n}"]
    if part.get("notes"):
        out += [""]
    return out


def _machine(part: dict) -> list[str]:
    f = part.get("figures", {})
    rows = [[k, _fmt(v, ".4g") if isinstance(v, float) else v] for k, v in f.items()
            if not isinstance(v, (dict, list))]
    out = _table(["what", "value"], rows) if rows else []
    if f.get("missing_packages"):
        out += ["**missing packages:** " + ", ".join(f["missing_packages"]) + " (see bench/README.md: carry their "
                "wheels)", ""]
    if f.get("packages"):
        out += ["packages: " + ", ".join(f"{k} {v}" for k, v in f["packages"].items()), ""]
    if f.get("imported_from"):
        out += ["imported from: " + ", ".join(f"{k} {v}" for k, v in f["imported_from"].items()), ""]
    if f.get("matmul_tflops"):
        out += ["measured matmul rate: " + ", ".join(f"{k} {v:.1f} TFLOP/s" for k, v in f["matmul_tflops"].items()),
                ""]
    return out


def _cuda_tests(part: dict) -> list[str]:
    f = part.get("figures", {})
    out = []
    if "passed" in f:
        out += [f"collected {f.get('tests', 0)}: passed {f.get('passed', 0)}, failed {f.get('failed', 0)}, "
                f"errors {f.get('errors', 0)}, skipped {f.get('skipped', 0)} (pytest exit code "
                f"{f.get('exit_code')})", ""]
    rows = [[r["test"], r["outcome"], r.get("message", "")] for r in part.get("rows", [])]
    if rows:
        out += _table(["test", "outcome", "message"], rows)
    return out


def _pipeline(part: dict) -> list[str]:
    f = part.get("figures", {})
    header = ["precision", "mode", "k", "test loop img/s", "whole call img/s", "peak MiB (all)", "peak MiB reserved",
              "peak MiB (above start)", "p-AUROC", "floor img/s", "time / floor"]
    out, rows = [], []
    for r in part.get("rows", []):
        head = [r.get("precision"), r.get("mode"), r.get("k", "")]
        if "error" in r or "skipped" in r:
            rows.append(head + [r.get("error") or r.get("skipped")] + [""] * (len(header) - len(head) - 1))
            continue
        reserved = r.get("peak_reserved_bytes")
        rows.append(head + [_fmt(r["loop_images_per_s"]), _fmt(r["images_per_s"]),
                            _fmt(r["peak_total_bytes"] / MiB, ".0f"),
                            _fmt(reserved / MiB if _finite(reserved) else None, ".0f"),
                            _fmt(r["peak_bytes"] / MiB, ".0f"),
                            _fmt(100 * r["p_auroc"] if _finite(r.get("p_auroc")) else None),
                            _fmt(r.get("floor_images_per_s")), _fmt(r.get("x_floor"))])
    if rows:
        out += _table(header, rows)
    if f.get("flops"):
        out += ["FLOP floor (backbone forward per test image): " + "; ".join(
            f"{role}: whole {v['whole_gflop']:.4g} GFLOP, {v['n_windows']} windows {v['windows_gflop']:.4g} GFLOP "
            f"({v['source']})" for role, v in f["flops"].items()), ""]
    return out


def _precision(part: dict) -> list[str]:
    rows = []
    for r in part.get("rows", []):
        if "error" in r:
            rows.append([r.get("method"), r.get("mode"), r.get("precision"), r["error"], "", "", "", ""])
            continue
        rows.append([r["method"], r["mode"], r["precision"], _fmt(r.get("max_abs_diff"), ".2e"),
                     _fmt(r.get("mean_abs_diff"), ".2e"), _fmt(r.get("p_auroc_fp32")), _fmt(r.get("p_auroc")),
                     _fmt(r.get("p_auroc_diff"), "+.3f")])
    return _table(["method", "mode", "precision", "max \\|diff\\|", "mean \\|diff\\|", "p-AUROC fp32",
                   "p-AUROC", "difference (points)"], rows) if rows else []


def _train(part: dict) -> list[str]:
    rows = []
    for r in part.get("rows", []):
        if "error" in r:
            rows.append([r.get("method"), r.get("precision", ""), r["error"], "", "", "", "", "", ""])
            continue
        reserved = r.get("peak_reserved_bytes")
        rows.append([r["method"], r["precision"], r["batch"], _fmt(r["s_per_step"], ".3f"),
                     _fmt(r["images_per_s"]), _fmt(r["peak_total_bytes"] / MiB, ".0f"),
                     _fmt(reserved / MiB if _finite(reserved) else None, ".0f"), _fmt(r["peak_bytes"] / MiB, ".0f"),
                     _fmt(r.get("loss"), ".4f")])
    return _table(["method", "backbone precision", "batch", "s / step", "img/s", "peak MiB (all)",
                   "peak MiB reserved", "peak MiB (above start)", "loss"], rows) if rows else []


def _torchrun(part: dict) -> list[str]:
    rows = [[r["processes"], _fmt(r["seconds"], ".1f"), _fmt(r.get("speedup")), r.get("metrics_equal", "")]
            for r in part.get("rows", []) if "error" not in r]
    rows += [[r.get("processes", ""), r["error"], "", ""] for r in part.get("rows", []) if "error" in r]
    return (_table(["processes", "wall s", "speed-up", "metrics equal to 1 process"], rows) if rows else [])


_SECTIONS = {"machine": _machine, "cuda_tests": _cuda_tests, "precision": _precision, "train": _train,
             "torchrun": _torchrun}


def render_markdown(report: dict) -> str:
    parts = report.get("parts", {})
    out = ["# GPU check report", ""]
    if report.get("dry_run"):
        out += ["**Dry run**: tiny random backbones on the CPU, a few images. The figures test the script, "
                "not the hardware; the targets do not apply.", ""]
    out += [f"- command: `{report.get('command', '')}`", f"- started: {report.get('started', '')}",
            f"- total: {_fmt(report.get('seconds'), '.1f')} s of a {_fmt(report.get('budget_s'), '.0f')} s budget",
            f"- exit code: {report.get('exit_code', '(running)')}"]
    if report.get("stopped"):
        out += [f"- **stopped:** {report['stopped']}"]
    out += [""]
    out += ["## Targets", ""]
    targets = report.get("targets", [])
    if targets:
        out += _table(["target", "subject", "figure", "value", "goal", "result", "detail"],
                      [[t["target"], t["subject"], t["figure"], _fmt(t["value"], ".4g"), t["goal"], t["result"],
                        t.get("detail", "")] for t in targets])
    else:
        out += ["(no target could be evaluated)", ""]
    out += ["## Parts", ""]
    out += _table(["part", "status", "seconds", "cap s", "error"],
                  [[n, p.get("status"), _fmt(p.get("seconds"), ".1f"), _fmt(p.get("cap_s"), ".0f"),
                    p.get("error") or ""] for n, p in parts.items()])
    for name, part in parts.items():
        out += _part_header(name, part)
        body = _pipeline if name.startswith("pipeline:") else _SECTIONS.get(name)
        if body is not None:
            out += body(part)
    return "\n".join(out).rstrip() + "\n"
