"""Run folders, per-run tables and the paper-style summary over seeds.

Layout: ``results/<model>/<dataset>/<k>shot/seed<s>/`` with
  config.json   the full configuration of the run
  metrics.json  {"per_category": {cls: metrics}, "mean": {...}, "excluded": {...}, ...}
  table.md      per-category table in percent, 'n/a' for undefined metrics
  report.html   the run as a page: metrics, curves and panels (--save-images), configuration

metrics.json is written last, so its presence means the run finished
(``is_run_complete``) and launchers can skip that seed.

Summary:  python -m utils.report aggregate RESULTS_DIR [--model NAME] [--out DIR]
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
from tabulate import tabulate

from utils.config import effective_test_settings
from utils.html import comparison_page, run_page
from utils.io import DuplicateKeyError, atomic_write_json, atomic_write_text, read_json, unique_keys

# (key in metrics.json, column header); thresholds are stored but not tabulated.
TABLE_METRICS = (
    ("i_auroc", "i-AUROC"),
    ("i_ap", "i-AP"),
    ("i_f1max", "i-F1max"),
    ("p_auroc", "p-AUROC"),
    ("p_ap", "p-AP"),
    ("p_f1max", "p-F1max"),
    ("p_aupro", "p-AUPRO"),
)
NA = "n/a"
_RESERVED = ("per_category", "mean", "excluded")
_SHOT_RE = re.compile(r"^(\d+)shot$")
_SEED_RE = re.compile(r"^seed(\d+)$")


# --------------------------------------------------------------------------- #
# one run
# --------------------------------------------------------------------------- #
def _check_name(what: str, name) -> str:
    name = str(name)
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise ValueError(f"{what} {name!r} cannot be used as a folder name")
    return name


def run_dir(results_root, model_name: str, dataset: str, k_shot: int, seed: int) -> Path:
    """``results_root/<model>/<dataset>/<k>shot/seed<s>``."""
    if int(seed) < 0 or int(k_shot) < 1:  # 'seed-1' would not be found by the aggregator
        raise ValueError(f"seed must be an integer >= 0 and k-shot >= 1, got seed {seed}, k-shot {k_shot}")
    return (Path(results_root) / _check_name("model_name", model_name)
            / _check_name("dataset", dataset) / f"{int(k_shot)}shot" / f"seed{int(seed)}")


def _num(v) -> float:
    # JSON stores undefined metrics as null; missing keys are undefined too.
    if v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _pct(v) -> str:
    v = _num(v)
    return NA if math.isnan(v) else f"{100.0 * v:.1f}"


def category_mean(per_category: dict) -> tuple[dict, dict]:
    """Mean of each table metric over the categories where it is defined,
    and for each metric the categories left out because it is NaN/null."""
    mean, excluded = {}, {}
    for key, _ in TABLE_METRICS:
        vals = {c: _num(m.get(key)) for c, m in per_category.items()}
        ok = [v for v in vals.values() if not math.isnan(v)]
        mean[key] = float(np.mean(ok)) if ok else math.nan
        excluded[key] = [c for c, v in vals.items() if math.isnan(v)]
    return mean, excluded


def _github(rows, headers) -> str:
    # disable_numparse keeps '97.0' as written (tabulate would print 97).
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True,
                    colalign=("left",) * (len(headers) - len(TABLE_METRICS))
                    + ("right",) * len(TABLE_METRICS))


def _excluded_note(excluded: dict, n_categories: int) -> str:
    parts = [f"{head}: {', '.join(excluded[key])}"
             for key, head in TABLE_METRICS if excluded.get(key)]
    if not parts:
        return f"Note: every mean is over all {n_categories} categories."
    return ("Note: n/a = undefined (single-class test set or no defect region); "
            "excluded from the mean: " + "; ".join(parts) + ".")


def format_run_table(per_category: dict, mean: dict, excluded: dict) -> str:
    rows = [[c] + [_pct(m.get(k)) for k, _ in TABLE_METRICS] for c, m in per_category.items()]
    rows.append(["mean"] + [_pct(mean.get(k)) for k, _ in TABLE_METRICS])
    table = _github(rows, ["category"] + [h for _, h in TABLE_METRICS])
    return table + "\n\n" + _excluded_note(excluded, len(per_category)) + "\n"


def write_run(run_dir, config: dict, per_category: dict, extra: dict | None = None, note: str | None = None) -> str:
    """Write config.json, table.md and finally metrics.json (all atomic).

    metrics.json = {"per_category", "mean" (over categories, NaN excluded),
    "excluded" (categories left out of each mean), **extra}.  Returns the
    print-ready table (the content of table.md); `note`, when given, is a paragraph
    appended to the table.
    """
    extra = dict(extra or {})
    clash = [k for k in extra if k in _RESERVED]
    if clash:
        raise ValueError(f"extra keys {clash} would overwrite {_RESERVED}")
    per_category = {str(c): dict(m) for c, m in per_category.items()}
    mean, excluded = category_mean(per_category)
    table = format_run_table(per_category, mean, excluded)
    if note:
        table += "\n" + note.strip() + "\n"
    d = Path(run_dir)
    atomic_write_json(d / "config.json", config)
    atomic_write_text(d / "table.md", table)
    # Last: its presence is what marks the run as complete.
    atomic_write_json(d / "metrics.json",
                      {"per_category": per_category, "mean": mean, "excluded": excluded, **extra})
    return table


RUN_PAGE = "report.html"
PANELS_INDEX = "panels.json"  # images/<category>/panels.json: which image each panel shows (test.py)
CURVE_KINDS = ("roc", "pr", "pro")  # curves/<category>_<kind>.png (utils.visualize.save_curves)


def run_title(run_dir) -> str:
    d = Path(run_dir)
    return f"{d.parent.parent.parent.name} | {d.parent.parent.name} | {d.parent.name} | {d.name}"


def write_run_page(run_dir) -> Path:
    """report.html of a finished run, from what its folder holds: config.json, metrics.json, and the
    curves and panels of test.py --save-images where they exist and this run drew them (pictures an
    earlier run left behind are not shown after a --force run without --save-images)."""
    d = Path(run_dir)
    config = read_json(d / "config.json", "results config")
    metrics = read_json(d / "metrics.json", "metrics file")
    curves, panels = {}, {}
    test = config.get("test") if isinstance(config.get("test"), dict) else {}
    for cls in metrics.get("per_category", {}) if test.get("save_images") else ():
        found = {k: f"curves/{cls}_{k}.png" for k in CURVE_KINDS if (d / "curves" / f"{cls}_{k}.png").is_file()}
        if found:
            curves[cls] = found
        index = d / "images" / cls / PANELS_INDEX
        if index.is_file():
            panels[cls] = [p for p in read_json(index, "panel index") if (d / p["panel"]).is_file()]
    return atomic_write_text(d / RUN_PAGE, run_page(run_title(d), config, metrics, TABLE_METRICS, curves, panels))


def is_run_complete(run_dir) -> bool:
    """True when run_dir/metrics.json exists and is a valid results file."""
    try:
        data = read_json(Path(run_dir) / "metrics.json", "metrics file")
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("per_category"), dict)


# --------------------------------------------------------------------------- #
# aggregation over seeds
# --------------------------------------------------------------------------- #
class Run(NamedTuple):
    model: str
    dataset: str
    shots: int
    seed: int
    per_category: dict
    mean: dict


def _metric_problem(where: str, metrics) -> str | None:
    """Why a metrics dict cannot be summarised, or None. Table metrics must be numbers in [0, 1] or
    null (undefined); other keys (thresholds, timings) are not summarised and not checked."""
    if not isinstance(metrics, dict):
        return f"{where} is {type(metrics).__name__}, expected an object of metrics"
    for key, _ in TABLE_METRICS:
        v = metrics.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"{where}[{key!r}] is {v!r}, expected a number or null"
        if not (math.isnan(v) or 0.0 <= v <= 1.0):  # NaN (json allows it) means undefined, like null
            return f"{where}[{key!r}] is {v!r}, outside [0, 1]"
    return None


def read_run_metrics(path) -> tuple[dict | None, str]:
    """(metrics.json content, '') when it can be summarised, else (None, the reason in one line)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"), object_pairs_hook=unique_keys)
    except OSError as e:
        return None, f"cannot read it ({e.strerror or e})"
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e})"
    except DuplicateKeyError as e:  # json.loads would keep the last value without a word
        return None, str(e)
    if not isinstance(data, dict) or not isinstance(data.get("per_category"), dict):
        return None, "no 'per_category' object (not a results file)"
    for cls, m in data["per_category"].items():
        problem = _metric_problem(f"per_category[{cls!r}]", m)
        if problem:
            return None, problem
    if isinstance(data.get("mean"), dict):  # any other 'mean' is recomputed from per_category
        problem = _metric_problem("mean", data["mean"])
        if problem:
            return None, problem
    return data, ""


def scan_runs(results_dir, model: str | None = None, skipped: list | None = None) -> list[Run]:
    """All finished runs under results_dir. A metrics.json that cannot be summarised is skipped with a
    warning naming it (never deleted or rewritten); `skipped` collects (path, reason) when given."""
    runs = []
    for f in sorted(Path(results_dir).glob("*/*/*/*/metrics.json")):
        seed_dir, shot_dir = f.parent, f.parent.parent
        shot, seed = _SHOT_RE.match(shot_dir.name), _SEED_RE.match(seed_dir.name)
        m_name, ds = shot_dir.parent.parent.name, shot_dir.parent.name
        if not (shot and seed) or (model is not None and m_name != model):
            continue
        canonical = (f"{int(shot.group(1))}shot", f"seed{int(seed.group(1))}")
        if (shot_dir.name, seed_dir.name) != canonical:  # seed07 next to seed7 would count one seed twice
            reason = f"not a folder name test.py writes ({'/'.join(canonical)}); rename it or move it out"
            data = None
        else:
            data, reason = read_run_metrics(f)
        if data is None:
            print(f"warning: skipping {f}: {reason}", file=sys.stderr)
            if skipped is not None:
                skipped.append((f, reason))
            continue
        per_cat = data["per_category"]
        mean = data.get("mean")
        if not isinstance(mean, dict):
            mean = category_mean(per_cat)[0]
        runs.append(Run(m_name, ds, int(shot.group(1)), int(seed.group(1)), per_cat, mean))
    return runs


def mean_std(values: Iterable) -> tuple[float, float, int]:
    """(mean, sample std ddof=1 or NaN for one value, count) of the defined values, in %."""
    v = np.array([100.0 * x for x in map(_num, values) if not math.isnan(x)])
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size >= 2 else math.nan, int(v.size)


def mean_std_str(values) -> str:
    """'mean±std' in % with 1 decimal; one value: 'mean'; none: 'n/a'.
    '(k/n)' is appended when only k of the n seeds define the metric."""
    values = list(values)
    m, s, k = mean_std(values)
    if k == 0:
        return NA
    text = f"{m:.1f}" if k == 1 else f"{m:.1f}±{s:.1f}"
    return text if k == len(values) else f"{text} ({k}/{len(values)})"


def _csv_num(x: float) -> str:
    return NA if math.isnan(x) else f"{x:.4f}"


def _csv(header, rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


_SUMMARY_NOTE = ("Values in %: mean±std over seeds (sample std, ddof=1); a single seed shows "
                 "the value alone; '(k/n)': defined in only k of n seeds; n/a: undefined.")


def _metric_cells(series: list[dict]):
    """Markdown cells and CSV cells for one row; series = metric dicts, one per seed."""
    md, num = [], []
    for key, _ in TABLE_METRICS:
        vals = [d.get(key) for d in series]
        m, s, _ = mean_std(vals)
        md.append(mean_std_str(vals))
        num += [_csv_num(m), _csv_num(s)]
    return md, num


def _csv_metric_header():
    return [f"{k}_{stat}" for k, _ in TABLE_METRICS for stat in ("mean", "std")]


def _exclusion_text(runs: list[Run]) -> str:
    """Categories left out of some seed's category mean, per metric ('' if none)."""
    parts = []
    for key, head in TABLE_METRICS:
        cats = sorted({c for r in runs for c, m in r.per_category.items()
                       if math.isnan(_num(m.get(key)))})
        if cats:
            parts.append(f"{head}: {', '.join(cats)}")
    return "; ".join(parts)


def _summary(runs: list[Run], with_model: bool) -> tuple[list, list, list]:
    """Rows (shots, dataset[, model]) of mean±std over seeds of each run's category mean."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault((r.shots, r.dataset, r.model) if with_model else (r.shots, r.dataset), []).append(r)
    md_rows, csv_rows, notes = [], [], []
    for key, rs in sorted(groups.items()):
        shots, ds, mdl = key[0], key[1], rs[0].model
        md, num = _metric_cells([r.mean for r in rs])
        md_rows.append([str(shots), ds] + ([mdl] if with_model else []) + [str(len(rs))] + md)
        csv_rows.append([mdl, shots, ds, len(rs)] + num)
        ex = _exclusion_text(rs)
        if ex:
            notes.append(f"- {shots}-shot {ds}{' ' + mdl if with_model else ''}: n/a categories left out of the "
                         f"mean: {ex}")
    return md_rows, csv_rows, notes


def paper_table(runs: list[Run], model: str) -> tuple[str, str]:
    """(markdown, csv): rows (shots, dataset), cells mean±std over seeds of the
    category-mean of each run."""
    md_rows, csv_rows, notes = _summary([r for r in runs if r.model == model], with_model=False)
    md = _github(md_rows, ["shots", "dataset", "seeds"] + [h for _, h in TABLE_METRICS])
    md = f"# {model}\n\n{md}\n\n{_SUMMARY_NOTE}\n" + "".join(n + "\n" for n in notes)
    return md, _csv(["model", "shots", "dataset", "seeds"] + _csv_metric_header(), csv_rows)


def comparison_table(runs: list[Run]) -> tuple[str, str]:
    """(markdown, csv): every model side by side, rows (shots, dataset, model), so a trained
    method's row stands next to the training-free baseline's."""
    md_rows, csv_rows, notes = _summary(runs, with_model=True)
    md = _github(md_rows, ["shots", "dataset", "model", "seeds"] + [h for _, h in TABLE_METRICS])
    md = f"# All models\n\n{md}\n\n{_SUMMARY_NOTE}\n" + "".join(n + "\n" for n in notes)
    return md, _csv(["model", "shots", "dataset", "seeds"] + _csv_metric_header(), csv_rows)


def category_table(runs: list[Run], model: str, dataset: str, shots: int) -> tuple[str, str]:
    """(markdown, csv): per category mean±std over seeds, plus the 'mean' row."""
    rs = sorted((r for r in runs if (r.model, r.dataset, r.shots) == (model, dataset, shots)),
                key=lambda r: r.seed)
    cats: list[str] = []
    for r in rs:
        cats += [c for c in r.per_category if c not in cats]
    md_rows, csv_rows = [], []
    for c in cats + ["mean"]:
        series = [r.mean for r in rs] if c == "mean" else \
                 [r.per_category[c] for r in rs if c in r.per_category]
        md, num = _metric_cells(series)
        md_rows.append([c, str(len(series))] + md)
        csv_rows.append([c, len(series)] + num)
    md = _github(md_rows, ["category", "seeds"] + [h for _, h in TABLE_METRICS])
    seeds = ", ".join(str(r.seed) for r in rs)
    md = f"# {model} / {dataset} / {shots}-shot (seeds {seeds})\n\n{md}\n\n{_SUMMARY_NOTE}\n"
    ex = _exclusion_text(rs)
    if ex:
        md += f"The 'mean' row leaves n/a categories out of each seed's mean: {ex}.\n"
    return md, _csv(["category", "seeds"] + _csv_metric_header(), csv_rows)


# test settings that change numbers (test.py RESULT_KEYS less paths and names)
SETTING_KEYS = ("winmode", "win_size", "win_stride", "win_weight", "image_index", "eval_size", "fpr_limit",
                "image_size", "precision")


def _run_config(results_dir: Path, run: Run) -> dict:
    try:
        config = read_json(run_dir(results_dir, run.model, run.dataset, run.shots, run.seed) / "config.json",
                           "results config")
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _run_facts(config: dict) -> tuple[dict, dict]:
    """(method and backbone(s), settings) of a run's config.json: the settings are the method's
    parameters and the test settings that change numbers (those its winmode ignores made canonical)."""
    method = config.get("method") if isinstance(config.get("method"), dict) else {}
    backbones = method.get("backbones") if isinstance(method.get("backbones"), dict) else {}
    names = {role: b.get("config", b.get("name")) if isinstance(b, dict) else b for role, b in backbones.items()}
    facts = {"method": method.get("method", "fdsl"),
             "backbone": next(iter(names.values())) if len(names) == 1 else
             ", ".join(f"{role}={name}" for role, name in names.items())}
    test = effective_test_settings(config["test"]) if isinstance(config.get("test"), dict) else {}
    settings = {k: v for k, v in method.items() if k not in ("method", "backbones") and not isinstance(v, (dict, list))}
    settings.update({k: test[k] for k in SETTING_KEYS if k in test})
    return facts, settings


def comparison_rows(runs: list[Run], results_dir, out) -> list[dict]:
    """The rows of comparison.html (as comparison.md's): mean and its text per metric, the method and
    backbone, and links from `out` to each seed's report.html where one exists."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault((r.shots, r.dataset, r.model), []).append(r)
    rows = []
    for (shots, ds, mdl), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r.seed)
        cells = {}
        for key, _ in TABLE_METRICS:
            values = [r.mean.get(key) for r in rs]
            cells[key] = (mean_std_str(values), mean_std(values)[0])
        reports = []
        for r in rs:
            page = run_dir(results_dir, r.model, r.dataset, r.shots, r.seed) / RUN_PAGE
            if page.is_file():
                reports.append((f"seed{r.seed}", os.path.relpath(page.resolve(), Path(out).resolve())))
        facts, settings = _run_facts(_run_config(Path(results_dir), rs[0]))
        rows.append({"shots": shots, "dataset": ds, "model": mdl, "seeds": len(rs), "facts": facts,
                     "settings": settings, "cells": cells, "reports": reports})
    # the settings column names what tells the rows apart: the keys whose values differ between them
    differ = [k for k in dict.fromkeys(k for r in rows for k in r["settings"])
              if len({json.dumps(r["settings"].get(k)) for r in rows}) > 1]
    for r in rows:
        settings = r.pop("settings")
        if differ:
            r["facts"]["settings"] = " ".join(f"{k}={settings[k]}" for k in differ if settings.get(k) is not None)
    return rows


class MixedCategoriesError(ValueError):
    """Seeds of one (model, dataset, k) row cover different categories: their means are different tables."""


def check_same_categories(runs: list[Run], results_dir) -> None:
    """Refuse to average seeds whose category sets differ (a run with --classes next to a full one): the
    mean over categories of one seed would be averaged with the mean over other categories of another.
    The message names the seeds and the categories that differ."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault((r.model, r.dataset, r.shots), []).append(r)
    for (mdl, ds, shots), rs in sorted(groups.items()):
        by_set: dict[frozenset, list[int]] = {}
        for r in sorted(rs, key=lambda r: r.seed):
            by_set.setdefault(frozenset(r.per_category), []).append(r.seed)
        if len(by_set) == 1:
            continue
        common = max(by_set, key=lambda c: (len(by_set[c]), len(c)))  # the set most seeds have

        def seeds(cats: frozenset) -> str:
            return f"seed{'s' if len(by_set[cats]) > 1 else ''} {', '.join(map(str, by_set[cats]))}"

        others = []
        for cats in sorted(by_set, key=lambda c: by_set[c]):
            if cats == common:
                continue
            diff = [f"missing {', '.join(sorted(common - cats))}" if common - cats else "",
                    f"extra {', '.join(sorted(cats - common))}" if cats - common else ""]
            others.append(f"{seeds(cats)} ({'; '.join(d for d in diff if d)})")
        raise MixedCategoriesError(
            f"{Path(results_dir) / mdl / ds / f'{shots}shot'}: {seeds(common)} "
            f"cover{'' if len(by_set[common]) > 1 else 's'} {len(common)} categories, but "
            f"{', '.join(others)}; mean±std over seeds needs the same categories in every seed: rerun those seeds "
            f"on the same categories, or move them out of {results_dir}")


def aggregate(results_dir, model: str | None = None, out=None, echo: bool = True,
              skipped: list | None = None) -> list[Path]:
    """Write <out>/<model>/paper.{md,csv} and <out>/<model>/<dataset>_<k>shot.{md,csv}, and without
    `model` <out>/comparison.{md,csv,html} (every model side by side; the page links each run's
    report.html).

    out defaults to results_dir/summary.  Returns the written paths; runs whose metrics.json cannot
    be read are left out with a warning and listed in `skipped` (see scan_runs).
    """
    results_dir = Path(results_dir)
    out = Path(out) if out is not None else results_dir / "summary"
    runs = scan_runs(results_dir, model, skipped)
    check_same_categories(runs, results_dir)  # before anything is written
    written = []
    if runs and model is None:
        md, text = comparison_table(runs)
        written += [atomic_write_text(out / "comparison.md", md), atomic_write_text(out / "comparison.csv", text),
                    atomic_write_text(out / "comparison.html",
                                      comparison_page(comparison_rows(runs, results_dir, out), TABLE_METRICS,
                                                      _SUMMARY_NOTE))]
        if echo:
            print(md)
    for mdl in sorted({r.model for r in runs}):
        md, text = paper_table(runs, mdl)
        written += [atomic_write_text(out / mdl / "paper.md", md),
                    atomic_write_text(out / mdl / "paper.csv", text)]
        if echo:
            print(md)
        for ds, shots in sorted({(r.dataset, r.shots) for r in runs if r.model == mdl}):
            md, text = category_table(runs, mdl, ds, shots)
            stem = f"{ds}_{shots}shot"
            written += [atomic_write_text(out / mdl / f"{stem}.md", md),
                        atomic_write_text(out / mdl / f"{stem}.csv", text)]
            if echo:
                print(md)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m utils.report")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("aggregate", help="mean±std over seeds of every finished run")
    a.add_argument("results_dir")
    a.add_argument("--model", default=None, help="only this model folder")
    a.add_argument("--out", default=None, help="output folder (default RESULTS_DIR/summary)")
    args = p.parse_args(argv)
    if not Path(args.results_dir).is_dir():
        print(f"error: results folder not found: {args.results_dir}", file=sys.stderr)
        return 2
    skipped: list = []
    try:
        written = aggregate(args.results_dir, args.model, args.out, skipped=skipped)
    except (OSError, MixedCategoriesError) as e:  # e.g. the output folder is not writable
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # every file is written atomically
        print("\ninterrupted (Ctrl-C); no half-written file was left", file=sys.stderr)
        return 130
    note = (f"; skipped {len(skipped)} run(s) whose metrics.json could not be read (named above)"
            if skipped else "")
    if not written:
        print(f"error: no finished run (<model>/<dataset>/<k>shot/seed<s>/metrics.json) "
              f"under {args.results_dir}" + (f" for model {args.model!r}" if args.model else "") + note,
              file=sys.stderr)
        return 1
    print(f"wrote {len(written)} files to {Path(written[0]).parent.parent}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
