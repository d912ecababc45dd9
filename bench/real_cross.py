"""FDSL's own protocol on real photos: train the heads on one real defect set (its test split, with
masks), test them k-shot on another set they never saw, beside knn and the training-free methods on
the same references; both directions between magnetic_tile and kolektor (../shared/data).

    python bench/real_cross.py --results-root /tmp/real_cross            # the full run (slow on CPU)
    python bench/real_cross.py --quick                                    # CI: a few images, 1 epoch
    python bench/real_cross.py --k 1 --seeds 0 --epochs 4 --train-k-shot 4 --results-root /tmp/real_cross

Per direction: train.py trains fdsl on the backbone --backbone (default the real offline ImageNet
efficientnet_lite0) with train seed --train-seed (111, the authors' fixed seed), --epochs epochs;
then test.py evaluates, for every k and seed, every training-free method (knn first) and every FDSL
row, on the same references (test.py picks them from the seed). FDSL rows are the product of
--bn-stats and --fd-merge, our own test-time options (methods/fdsl.py; the defaults `train` and
`none` are the authors' code); each row is named by its options (fdsl, fdsl_bnref, fdsl_fdm0.75,
fdsl_bnref_fdm0.75) and test.py records them in the run's config.json (test.params and the method
config). The table (bench/real_photos.py's) gives i-AUROC, p-AUROC, AUPRO, p-AP in % (mean±std over
seeds), time per test image, its ratio to knn's, peak memory and the reference bank.

The curve: every FDSL row is also tested after every epoch (first k, first seed: the unseen set's
metrics per epoch), read back from each run's config.json (checkpoint_epoch), so over- and
under-training show. DCP-SFR is not run: its backbone is CLIP with its text tower, and no real CLIP
weights can be loaded offline here (docs/real_photos.md).

Runs go to --results-root (default: a temporary folder, deleted at the end); with a kept folder a
rerun reuses finished training epochs and test runs (train.py's and test.py's rules); the
summary of each direction goes to real_cross_<train>_to_<test>.json there.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA_ENV = "FSAD_SHARED_DATA"  # folder holding magnetic_tile/ and kolektor/ (default ../shared/data)
DEFAULT_DATA = REPO.parent / "shared" / "data"
DIRECTIONS = ("magnetic_tile:kolektor", "kolektor:magnetic_tile")
CURVE_METRICS = (("i_auroc", "i-AUROC"), ("p_auroc", "p-AUROC"), ("p_aupro", "AUPRO"), ("p_ap", "p-AP"))


def _real_photos():
    """bench/real_photos.py (its dataset preparation, rows, runs and table), imported by path."""
    if "real_photos" in sys.modules:
        return sys.modules["real_photos"]
    spec = importlib.util.spec_from_file_location("real_photos", REPO / "bench" / "real_photos.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["real_photos"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- #
# FDSL rows: one per combination of our test-time options
# --------------------------------------------------------------------------- #
def fdsl_params(bn_stats: str, fd_merge: float | None) -> dict:
    """The test-time parameters of one FDSL row; the authors' defaults are left out (an empty dict
    is the authors' FDSL)."""
    params = {}
    if bn_stats != "train":
        params["bn_stats"] = bn_stats
    if fd_merge is not None:
        params["fd_merge"] = float(fd_merge)
    return params


def fdsl_label(params: dict) -> str:
    """Row and results-folder name of an FDSL row: every option that differs from the authors' code
    is in it (fdsl, fdsl_bnref, fdsl_fdm0.75, fdsl_bnref_fdm0.75)."""
    unknown = sorted(set(params) - {"bn_stats", "fd_merge"})
    if unknown:
        raise ValueError(f"fdsl rows know the options bn_stats and fd_merge, got {unknown}")
    label = "fdsl"
    if params.get("bn_stats", "train") != "train":
        label += "_bnref" if params["bn_stats"] == "reference" else f"_bn{params['bn_stats']}"
    if params.get("fd_merge") is not None:
        label += f"_fdm{float(params['fd_merge']):g}"
    return label


def parse_fd_merge(values: list[str]) -> list[float | None]:
    out = []
    for v in values:
        if v.lower() == "none":
            out.append(None)
            continue
        try:
            w = float(v)
        except ValueError:
            raise ValueError(f"--fd-merge: expected 'none' or a weight in [0, 1], got '{v}'") from None
        if not 0 <= w <= 1:
            raise ValueError(f"--fd-merge: a weight must be in [0, 1], got {w}")
        out.append(w)
    return out


def fdsl_rows(bn_stats: list[str], fd_merge: list[float | None]) -> list[tuple[str, dict]]:
    rows = [(fdsl_label(p), p) for p in (fdsl_params(b, w) for b in bn_stats for w in fd_merge)]
    labels = [r[0] for r in rows]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--bn-stats / --fd-merge give the same row twice: {labels}")
    return rows


# --------------------------------------------------------------------------- #
# the curve: the unseen set's metrics per training epoch
# --------------------------------------------------------------------------- #
def epoch_curve(run_dirs: list[Path]) -> list[dict]:
    """[{epoch, i_auroc, ...}] of test runs of one row's checkpoints, ordered by the epoch each run's
    config.json says its checkpoint had (not by the order given); two runs of one epoch are refused."""
    points = {}
    for run in run_dirs:
        run = Path(run)
        epoch = json.loads((run / "config.json").read_text())["checkpoint_epoch"]
        if not isinstance(epoch, int):
            raise ValueError(f"{run}: config.json has no checkpoint epoch (a training-free run?)")
        if epoch in points:
            raise ValueError(f"two runs of epoch {epoch}: {points[epoch]['run']} and {run}")
        mean = json.loads((run / "metrics.json").read_text())["mean"]
        points[epoch] = {"epoch": epoch, "run": str(run), **{k: mean.get(k) for k, _ in CURVE_METRICS}}
    return [points[e] for e in sorted(points)]


def curve_table(curves: dict[str, list[dict]], reference: dict | None = None) -> str:
    """Markdown: one row per (label, epoch), metrics in %; `reference` (knn's mean metrics at the same
    k and seed) as a last row to read the curve against."""
    from tabulate import tabulate

    out = [[label, str(p["epoch"])] + [f"{100 * p[k]:.1f}" if p[k] is not None else "n/a" for k, _ in CURVE_METRICS]
           for label, points in curves.items() for p in points]
    if reference is not None:
        out.append(["knn (no training)", "-"] + [f"{100 * reference[k]:.1f}" for k, _ in CURVE_METRICS])
    return tabulate(out, headers=["row", "epoch"] + [h for _, h in CURVE_METRICS], tablefmt="github",
                    disable_numparse=True)


# --------------------------------------------------------------------------- #
# the diagnosis: how far the training set's BatchNorm statistics are from a test set's
# --------------------------------------------------------------------------- #
def bn_shift(trained: dict[str, "torch.Tensor"], reference: dict[str, "torch.Tensor"], n_layers: int) -> list[dict]:
    """Per layer, the first BatchNorm of its ASL head (the one that sees the residuals): the mean over
    channels of |reference mean - trained mean| / trained std, and the median over channels of
    reference variance / trained variance. 0 and 1 when the residuals are distributed as in training."""
    out = []
    for layer in range(n_layers):
        key = f"heads.{layer}.net.0"
        mu, var = trained[f"{key}.running_mean"], trained[f"{key}.running_var"]
        ref_mu, ref_var = reference[f"{key}.running_mean"], reference[f"{key}.running_var"]
        out.append({"layer": layer, "channels": int(mu.numel()),
                    "mean_shift": float(((ref_mu - mu).abs() / var.sqrt().clamp_min(1e-12)).mean()),
                    "var_ratio": float((ref_var / var.clamp_min(1e-12)).median())})
    return out


BN_SHIFT_IMAGES = 16  # normal test images per set whose residuals the diagnosis measures


def measure_bn_shift(a, checkpoint: Path, roots: dict[str, Path], k: int, seed: int) -> dict[str, list[dict]]:
    """bn_shift of the trained heads, per dataset in `roots` ({name: prepared root}), on two sets of
    residuals: "<name> refs", its k references (seed) aligned leave-one-out, which bn_stats reference
    uses; "<name> normal test", its first BN_SHIFT_IMAGES normal test images aligned to those
    references, which is what the heads see at test time (read here for the diagnosis only). The
    training set's rows are the in-distribution baseline."""
    import torch

    from data.dataset import load_image, load_meta, select_k_shot
    from methods.checkpoint import load_method
    from models.fdsl import reference_bn_stats
    from models.memory import align_to_banks
    from utils.config import resolve_device

    method, _ = load_method(checkpoint, resolve_device(a.device), params={"bn_stats": "reference"})
    trained = {n: b.clone() for n, b in method.heads.named_buffers()}
    n_layers = len(method.heads.heads)
    out = {}
    for name, root in roots.items():
        meta = load_meta(root)
        cls = sorted(meta["train"])[0]
        load = lambda items: torch.stack([load_image(root / it["img_path"], method.image_size) for it in items]).to(
            method.device)
        state = method.fit(load(select_k_shot(meta, cls, k, seed)), category=cls)
        out[f"{name} refs"] = bn_shift(trained, state.bn_stats, n_layers)
        normal = [it for it in meta["test"][cls] if not it["anomaly"]][:BN_SHIFT_IMAGES]
        with torch.no_grad():
            feats = method.backbone(load(normal))
            aligned = align_to_banks(feats.patch_tokens, [state.bank] * len(normal))
        out[f"{name} normal test"] = bn_shift(trained, reference_bn_stats(method.heads, feats.patch_tokens, aligned),
                                              n_layers)
    return out


def bn_shift_table(shifts: dict[str, list[dict]]) -> str:
    from tabulate import tabulate

    names = list(shifts)
    rows = []
    for i, first in enumerate(shifts[names[0]]):
        rows.append([str(first["layer"] + 1), str(first["channels"])]
                    + [f"{shifts[n][i]['mean_shift']:.2f}" for n in names]
                    + [f"{shifts[n][i]['var_ratio']:.2f}" for n in names])
    head = ["layer", "channels"] + [f"mean shift, {n}" for n in names] + [f"var ratio, {n}" for n in names]
    return tabulate(rows, headers=head, tablefmt="github", disable_numparse=True)


# --------------------------------------------------------------------------- #
# the run
# --------------------------------------------------------------------------- #
def train_heads(a, train_root: Path, train_name: str, epochs: int):
    """train.py on the training set's test split; returns the checkpoint folder (a kept results
    folder: finished epochs are reused, more epochs continue the run)."""
    import train
    from utils.config import MethodConfig, TrainConfig

    out = Path(a.results_root) / "train" / f"{train_name}_seed{a.train_seed}"
    cfg = TrainConfig(data_root=str(train_root), dataset=train_name, out_dir=str(out),
                      method=MethodConfig(name="fdsl", backbone=a.backbone, pretrained=a.pretrained),
                      seed=a.train_seed, epochs=epochs, batch_size=a.batch_size, train_k_shot=a.train_k_shot,
                      device=a.device, precision=a.precision)
    train.train(cfg)
    return out


def run_direction(a, rp, test_script, train_name: str, test_name: str, log) -> dict:
    """Train on `train_name`, test on `test_name`; returns {table, curve, rows, ...} for the report."""
    data = Path(a.data_root)
    work = Path(a.results_root) / "_dataset"
    train_root, _ = rp.prepare_dataset((data / train_name).resolve(), a.quick, work / train_name)
    test_root, meta = rp.prepare_dataset((data / test_name).resolve(), a.quick, work / test_name)
    categories = sorted(meta["test"])
    dataset = test_name + ("_quick" if a.quick else "")
    log(f"train fdsl on {train_name} ({a.epochs} epochs)")
    ckpt_dir = train_heads(a, train_root, train_name, a.epochs)

    free = rp.build_rows(a.methods, False, [], a.backbone, a.pretrained, categories)
    learned = [(label, params) for label, params in fdsl_rows(a.bn_stats, a.fd_merge)]
    final = ckpt_dir / f"epoch_{a.epochs}.pth"
    rows = free + [rp.Row(label, params=params, checkpoint=str(final)) for label, params in learned]
    results = {}
    for row in rows:
        for k in a.k:
            for seed in a.seeds:
                log(f"{test_name} {row.label} k={k} seed={seed}")
                results.setdefault((row.label, k), []).append(rp.run_one(test_script, row, test_root, dataset, k, seed, a))
    curves = {}
    k0, s0 = a.k[0], a.seeds[0]
    for label, params in learned:
        if a.curve_rows is not None and label not in a.curve_rows:
            continue
        dirs = []
        for epoch in range(1, a.epochs + 1):
            name = label if epoch == a.epochs else f"{label}_ep{epoch}"
            row = rp.Row(name, params=params, checkpoint=str(ckpt_dir / f"epoch_{epoch}.pth"))
            if epoch < a.epochs:
                log(f"{test_name} curve {label} epoch {epoch} k={k0} seed={s0}")
                rp.run_one(test_script, row, test_root, dataset, k0, s0, a)
            from utils import report

            dirs.append(report.run_dir(a.results_root, name, dataset, k0, s0))
        curves[label] = epoch_curve(dirs)
    knn = results.get(("knn", k0))
    shifts = measure_bn_shift(a, final, {train_name: train_root, test_name: test_root}, k0, s0)
    return {"bn_shift": shifts, "bn_shift_table": bn_shift_table(shifts), "train": train_name, "test": test_name, "dataset": dataset, "categories": categories,
            "n_test": sum(len(meta["test"][c]) for c in categories),
            "table": rp.table(results, rows, categories, a.k),
            "curve": curves, "curve_table": curve_table(curves, knn[0]["mean"] if knn else None),
            "curve_k": k0, "curve_seed": s0, "rows": [r.label for r in rows]}


def report_text(a, done: list[dict]) -> str:
    parts = []
    for d in done:
        parts.append(
            f"## train {d['train']} -> test {d['dataset']} ({', '.join(d['categories'])}, {d['n_test']} test images)\n\n"
            f"fdsl heads: {a.backbone}, train seed {a.train_seed}, {a.epochs} epoch(s), train k {a.train_k_shot}, "
            f"batch {a.batch_size}; training-free rows on the same backbone and references; eval size {a.eval_size}, "
            f"{a.device}, {a.precision}, seeds {a.seeds}; metrics in %, mean±std over seeds.\n\n"
            f"{d['table']}\n\n"
            f"Per epoch (k={d['curve_k']}, seed {d['curve_seed']}, the unseen set):\n\n{d['curve_table']}\n\n"
            f"BatchNorm shift of the final heads (first BN of each layer's ASL head, on the residuals of "
            f"{d['curve_k']} reference(s), seed {d['curve_seed']}): mean over channels of |mean - trained mean| / "
            f"trained std, median of variance / trained variance; 0 and 1 = as in training:\n\n{d['bn_shift_table']}\n")
    return "\n".join(parts)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=Path(os.environ.get(DATA_ENV, DEFAULT_DATA)),
                   help=f"folder holding magnetic_tile/ and kolektor/ (default: ${DATA_ENV} or %(default)s)")
    p.add_argument("--directions", nargs="+", default=list(DIRECTIONS), metavar="TRAIN:TEST",
                   help="datasets (folders of --data-root) to train on and test on (default: both ways)")
    p.add_argument("--quick", action="store_true", help="CI smoke run: 4 normal + 4 anomalous images of each "
                   "set (training and test), 1 epoch, train k 1, k = 1, seed 0")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4], help="shots (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="test seeds (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=6, help="training epochs (default: %(default)s)")
    p.add_argument("--train-seed", type=int, default=111, help="training seed (default: %(default)s, the authors')")
    p.add_argument("--train-k-shot", type=int, default=10, help="references per category while training "
                   "(default: %(default)s, train.py's)")
    p.add_argument("--bn-stats", nargs="+", default=["train", "reference"], choices=("train", "reference"),
                   help="fdsl rows: BatchNorm statistics of the training set (the authors') and/or recomputed on "
                   "each test category's references (default: %(default)s)")
    p.add_argument("--fd-merge", nargs="+", default=["none", "0.75"], metavar="none|W",
                   help="fdsl rows: the learned map alone (none, the authors' code) and/or merged with the raw FD "
                   "distance at weight W (the paper's merge) (default: %(default)s)")
    p.add_argument("--curve-rows", nargs="*", default=None, metavar="LABEL",
                   help="fdsl rows tested after every epoch (default: all; none: no curve)")
    p.add_argument("--methods", nargs="+", default=None, help="training-free methods (default: all registered)")
    p.add_argument("--backbone", default="efficientnet_lite0", help="backbone of every row (default: %(default)s)")
    p.add_argument("--pretrained", default=None, help="its weights (default: the backbone config's)")
    _real_photos().add_run_options(p)
    a = p.parse_args(argv)
    try:
        a.fd_merge = parse_fd_merge(a.fd_merge)
        fdsl_rows(a.bn_stats, a.fd_merge)
    except ValueError as e:
        p.error(str(e))
    for spec in a.directions:
        train_name, sep, test_name = spec.partition(":")
        if not sep or not train_name or not test_name or train_name == test_name:
            p.error(f"--directions '{spec}': expected TRAIN:TEST with two different datasets, e.g. magnetic_tile:kolektor")
    if a.epochs < 1:
        p.error(f"--epochs must be >= 1, got {a.epochs}")
    if a.quick:
        a.k, a.seeds, a.epochs, a.train_k_shot = [1], [0], 1, 1
    a.image_index, a.report_only = "windows", False  # what bench/real_photos.run_one reads
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    from launch import _script
    from utils.cli import run_cli

    def work():
        rp = _real_photos()
        missing = [n for spec in a.directions for n in spec.split(":") if not (Path(a.data_root) / n).is_dir()]
        if missing:
            raise FileNotFoundError(f"--data-root {a.data_root}: dataset folder(s) not found: {sorted(set(missing))} "
                                    f"(set ${DATA_ENV} or pass --data-root)")
        test_script = _script("test")
        t0 = time.time()
        log = lambda msg: print(f"[{time.time() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="real_cross_") as tmp:
            if a.results_root is None:
                a.results_root = Path(tmp) / "results"
            a.results_root = Path(a.results_root).resolve()
            rp.warm_up(a)
            done = [run_direction(a, rp, test_script, *spec.split(":"), log) for spec in a.directions]
            text = report_text(a, done)
            print(text)
            if a.out is not None:
                from utils.io import atomic_write_text

                atomic_write_text(a.out, text)
            from utils.io import atomic_write_json

            args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
            for d in done:  # one file per direction: two directions may run at once into one folder
                atomic_write_json(a.results_root / f"real_cross_{d['train']}_to_{d['dataset']}.json",
                                  {"args": args, **{k: v for k, v in d.items() if k not in ("table", "curve_table", "bn_shift_table")}})

    return run_cli("real_cross.py", work)


if __name__ == "__main__":
    sys.exit(main())
