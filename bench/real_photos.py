"""Every training-free method (and given checkpoints) on real photos with real pretrained features,
in one comparison table.

    python bench/real_photos.py ../shared/data/magnetic_tile
    python bench/real_photos.py DATA_ROOT --checkpoint fdsl=results/x/epoch_5.pth --checkpoint dcpsfr=PATH
    python bench/real_photos.py DATA_ROOT --quick          # a few images, 1 seed, k = 1: a smoke run

DATA_ROOT is an MVTec-layout folder (<category>/train/good, <category>/test/<defect>,
<category>/ground_truth/...); its meta.json is used when present, else one is built in a temporary
folder (DATA_ROOT is only read). Rows: every registered method with trainable = False (with the
backbone --backbone, default the real offline ImageNet efficientnet_lite0 weights) and each of its
ablations (Method.ablations), then each --checkpoint (its own backbone). Rows whose parameters act
the same on this dataset's categories (e.g. anomalydino's category masking on categories it does not
mask) are run once and marked "= row". Each row runs for every k (default 1 2 4) and seed (default
0 1 2) through test.py's evaluate (the same references, maps and metric code as every results
folder), and the table shows, per category, mean ± std over seeds in %, the time per test image
(test loop: reading, predicting, copying maps; ratio to knn's in this run, same k) and the peak memory
while the category ran (max over seeds; CPU: the process's peak resident set, which includes Python,
torch and the backbone: compare rows, not absolute values) and the reference bank per category.

Runs go to --results-root (default: a temporary folder, deleted at the end); with a kept folder a
rerun reuses the finished runs (test.py's rule), so a long bench can be resumed.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUICK_IMAGES = 4  # --quick: normal and anomalous test images per category, each
METRICS = (("i_auroc", "i-AUROC"), ("p_auroc", "p-AUROC"), ("p_aupro", "AUPRO"), ("p_ap", "p-AP"))


@dataclass
class Row:
    label: str
    method: str | None = None  # training-free method name
    params: dict = field(default_factory=dict)
    checkpoint: str = ""
    same_as: str | None = None  # label of an earlier row with the same effective configuration


# --------------------------------------------------------------------------- #
# dataset
# --------------------------------------------------------------------------- #
def prepare_dataset(root: Path, quick: bool, work: Path) -> tuple[Path, dict]:
    """(root to evaluate, its meta). DATA_ROOT's own meta.json when present and the full set is run;
    otherwise `work`/data (a fixed path, so that a kept results folder is recognised by a rerun) that
    links DATA_ROOT's category folders and holds the meta."""
    from data.dataset import load_meta
    from data.meta import write_meta
    from data.mvtec import build_meta

    if not root.is_dir():
        raise FileNotFoundError(f"DATA_ROOT not found: {root} (an MVTec-layout folder: <category>/train/good, "
                                f"<category>/test/<defect>)")
    meta = load_meta(root) if (root / "meta.json").is_file() else build_meta(root)
    if (root / "meta.json").is_file() and not quick:
        return root, meta
    if quick:  # the first normal and anomalous test images of each category (sorted paths): deterministic
        for cls, items in meta["test"].items():
            meta["test"][cls] = ([it for it in items if not it["anomaly"]][:QUICK_IMAGES]
                                 + [it for it in items if it["anomaly"]][:QUICK_IMAGES])
    linked = work / ("data_quick" if quick else "data")
    linked.mkdir(parents=True, exist_ok=True)
    for top in sorted({it["img_path"].split("/")[0] for split in meta.values() if isinstance(split, dict)
                       for items in split.values() for it in items}):
        link = linked / top
        if link.is_symlink():
            link.unlink()
        link.symlink_to((root / top).resolve(), target_is_directory=True)
    write_meta(linked, meta)
    return linked, meta


# --------------------------------------------------------------------------- #
# rows
# --------------------------------------------------------------------------- #
def effective_key(config: dict, categories: list[str]) -> str:
    """A training-free method config reduced to what changes its numbers on these categories."""
    cfg = {k: v for k, v in config.items() if k not in ("method", "description")}
    masking = cfg.get("masking")
    if masking == "categories":
        masked = [c for c in categories if c in cfg.get("mask_categories", [])]
        cfg["masking"] = "on" if len(masked) == len(categories) else ("off" if not masked else "categories")
        cfg["mask_categories"] = masked
    if cfg.get("masking") in ("on", "off"):
        cfg.pop("mask_categories", None)
    if cfg.get("masking") == "off":
        cfg.pop("mask_threshold", None)
    return json.dumps(cfg, sort_keys=True)


def build_rows(methods: list[str] | None, ablations: bool, checkpoints: list[str], backbone: str | None,
               pretrained: str | None, categories: list[str]) -> list[Row]:
    from methods import METHODS, resolve_method_config
    from utils.config import MethodConfig

    names = sorted((n for n, cls in METHODS.items() if not cls.trainable), key=lambda n: (n != "knn", n))
    if methods:
        unknown = [m for m in methods if m not in names]
        if unknown:
            raise ValueError(f"--methods {unknown}: training-free methods are {', '.join(names)}")
        names = methods
    rows, seen = [], {}
    for name in names:
        variants = [(name, {})] + ([(f"{name}-{a}", p) for a, p in METHODS[name].ablations.items()] if ablations else [])
        for label, params in variants:
            cfg = resolve_method_config(MethodConfig(name=name, backbone=backbone, pretrained=pretrained, params=params))
            key = effective_key(cfg, categories)
            rows.append(Row(label, name, dict(params), same_as=seen.get(key)))
            seen.setdefault(key, label)
    for spec in checkpoints:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise ValueError(f"--checkpoint '{spec}': expected LABEL=PATH, e.g. fdsl=results/x/epoch_5.pth")
        if not Path(path).is_file():
            raise FileNotFoundError(f"--checkpoint {label}: file not found: {path}")
        rows.append(Row(label, checkpoint=path))
    labels = [r.label for r in rows]
    if len(set(labels)) != len(labels):
        raise ValueError(f"row labels must differ, got {labels}")
    return rows


def select_rows(rows: list[Row], labels: list[str] | None) -> list[Row]:
    """Only the rows named (--rows); one whose twin is left out runs on its own."""
    if not labels:
        return rows
    unknown = [l for l in labels if l not in {r.label for r in rows}]
    if unknown:
        raise ValueError(f"--rows {unknown}: the rows are {', '.join(r.label for r in rows)}")
    kept = [r for r in rows if r.label in labels]
    for r in kept:
        if r.same_as not in labels:
            r.same_as = None
    return kept


# --------------------------------------------------------------------------- #
# runs
# --------------------------------------------------------------------------- #
def run_one(test_script, row: Row, data_root: Path, dataset: str, k: int, seed: int, a) -> dict | None:
    """test.py's evaluate for one row, k and seed; returns its metrics.json (--report-only: that of a
    finished run, None when there is none)."""
    from utils import report
    from utils.config import TestConfig

    if a.report_only:
        folder = report.run_dir(a.results_root, row.label, dataset, k, seed)
        return json.loads((folder / "metrics.json").read_text()) if report.is_run_complete(folder) else None

    trained = bool(row.checkpoint)
    cfg = TestConfig(data_root=str(data_root), dataset=dataset, checkpoint=row.checkpoint,
                     method=None if trained else row.method, backbone=None if trained else a.backbone,
                     pretrained=None if trained else a.pretrained, results_root=str(a.results_root),
                     model_name=row.label, k_shot=k, seed=seed, eval_size=a.eval_size, batch_size=a.batch_size,
                     device=a.device, precision=a.precision, params=row.params, image_index=a.image_index)
    with contextlib.redirect_stdout(io.StringIO()):  # test.py prints each run's table; ours comes at the end
        run_dir = test_script.evaluate(cfg)
    return json.loads((run_dir / "metrics.json").read_text())


def _mean_std(values: list[float]) -> str:
    vals = [100 * v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "n/a"
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{m:.1f}"
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
    return f"{m:.1f}±{sd:.1f}"


def _infos(runs: list[dict], cls: str) -> list[dict]:
    return [v for r in runs for c, v in r["categories"].items() if cls in ("mean", c)]


def _seconds(runs: list[dict], cls: str) -> float | None:
    info = _infos(runs, cls)
    return sum(i["seconds_per_image"] for i in info) / len(info) if info else None


def warm_up(a) -> None:
    """One throwaway prediction, so the first timed row does not pay the process's first-call costs."""
    import torch

    from methods import create_method, resolve_method_config
    from utils.config import MethodConfig, resolve_device

    method = create_method(resolve_method_config(MethodConfig(name="knn", backbone=a.backbone, pretrained=a.pretrained)),
                           resolve_device(a.device)).eval()
    s = method.image_size
    method.predict(torch.rand(a.batch_size, 3, s, s), method.fit(torch.rand(1, 3, s, s)), (a.eval_size,) * 2)


def table(results: dict, rows: list[Row], categories: list[str], ks: list[int]) -> str:
    """results[(label, k)] = list of metrics.json (one per seed)."""
    from tabulate import tabulate

    head = ["category", "k", "method", "seeds"] + [h for _, h in METRICS] + ["s/image", "x knn", "peak MiB", "bank MiB"]
    out = []
    for cls in categories + (["mean"] if len(categories) > 1 else []):
        for k in ks:
            base = _seconds(results.get(("knn", k), []), cls)
            for row in rows:
                runs = results.get((row.same_as or row.label, k), [])
                if not runs:
                    continue
                if cls == "mean":
                    metric = {key: [r["mean"].get(key) for r in runs] for key, _ in METRICS}
                else:
                    metric = {key: [r["per_category"][cls].get(key) for r in runs] for key, _ in METRICS}
                info = _infos(runs, cls)
                sec = _seconds(runs, cls)
                peak = max(i.get("peak_memory_mib", float("nan")) for i in info)
                bank = max(i.get("bank_bytes", 0) + i.get("window_bank_bytes", 0) for i in info) / 2 ** 20
                label = row.label + (f" (= {row.same_as})" if row.same_as else "")
                out.append([cls, str(k), label, str(len(runs))] + [_mean_std(metric[key]) for key, _ in METRICS]
                           + [f"{sec:.3f}", f"{sec / base:.2f}" if base else "", f"{peak:.0f}", f"{bank:.1f}"])
    return tabulate(out, headers=head, tablefmt="github", disable_numparse=True)


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Where and how the runs go: shared with bench/real_cross.py."""
    p.add_argument("--eval-size", type=int, default=240, help="metric resolution (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--results-root", type=Path, default=None, help="keep the runs here (default: a temporary "
                   "folder, deleted at the end)")
    p.add_argument("--out", type=Path, default=None, help="also write the table (markdown) to this file")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_root", type=Path, help="MVTec-layout folder (every category in it is run)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="LABEL=PATH",
                   help="a trained method's checkpoint as an extra row (repeatable), e.g. fdsl=PATH")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_IMAGES} normal + {QUICK_IMAGES} anomalous test "
                   f"images per category, seed 0, k = 1")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4], help="shots (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: %(default)s)")
    p.add_argument("--methods", nargs="+", default=None, help="training-free methods (default: all registered)")
    p.add_argument("--no-ablations", dest="ablations", action="store_false", help="leave out the ablation rows")
    p.add_argument("--rows", nargs="+", default=None, metavar="LABEL", help="only these rows, e.g. knn anomalydino "
                   "knn-aug (default: all)")
    p.add_argument("--report-only", action="store_true", help="run nothing: the table of the runs already "
                   "finished in --results-root (the seeds column says how many)")
    p.add_argument("--backbone", default="efficientnet_lite0", help="backbone of the training-free rows "
                   "(default: %(default)s)")
    p.add_argument("--pretrained", default=None, help="its weights (default: the backbone config's)")
    p.add_argument("--image-index", default="windows", choices=("off", "windows", "all"), help="test.py's "
                   "--image-index: 'all' matches each test image against its most similar reference only (with "
                   "rotations: the most similar rotated copy) (default: %(default)s)")
    add_run_options(p)
    a = p.parse_args(argv)
    if a.report_only and a.results_root is None:
        p.error("--report-only reads a kept --results-root")
    if a.quick:
        a.k, a.seeds = [1], [0]
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.path.insert(0, str(REPO))
    from launch import _script
    from utils.cli import run_cli

    def work():
        test_script = _script("test")
        with tempfile.TemporaryDirectory(prefix="real_photos_") as tmp:
            if a.results_root is None:
                a.results_root = Path(tmp) / "results"
            data_root, meta = prepare_dataset(a.data_root.resolve(), a.quick, a.results_root.resolve() / "_dataset")
            categories = sorted(meta["test"])
            rows = select_rows(build_rows(a.methods, a.ablations, a.checkpoint, a.backbone, a.pretrained, categories),
                               a.rows)
            dataset = a.data_root.resolve().name + ("_quick" if a.quick else "")
            results = {}
            warm_up(a)
            t0 = time.time()
            for row in rows:
                if row.same_as:
                    continue
                for k in a.k:
                    for seed in a.seeds:
                        if not a.report_only:
                            print(f"[{time.time() - t0:6.0f} s] {dataset} {row.label} k={k} seed={seed}", file=sys.stderr)
                        found = run_one(test_script, row, data_root, dataset, k, seed, a)
                        if found is not None:
                            results.setdefault((row.label, k), []).append(found)
            text = (f"# {dataset}: {', '.join(categories)}\n\n"
                    f"Training-free rows on {a.backbone} (weights: {a.pretrained or 'the config default'}), "
                    f"eval size {a.eval_size}, image index {a.image_index}, {a.device}, {a.precision}, seeds {a.seeds}, "
                    f"{sum(len(meta['test'][c]) for c in categories)} test images; metrics in %, mean±std over seeds.\n\n"
                    + table(results, rows, categories, a.k) + "\n")
            print(text)
            if a.out is not None:
                from utils.io import atomic_write_text

                atomic_write_text(a.out, text)

    return run_cli("real_photos.py", work)


if __name__ == "__main__":
    sys.exit(main())
