"""Evaluate a method k-shot on a dataset's test split.

    python test.py --data-root DIR --dataset visa --checkpoint CKPT --k-shot 1 --seed 0
    python test.py --data-root DIR --dataset visa --method knn --backbone tiny_clip   # training-free
    python test.py --data-root DIR --method knn --param top_percent=1 --param 'rotations=[0,90,180,270]'
    python test.py --data-root DIR --method knn --k-shot 4 --calibrate 20   # + thresholds without labels

Writes results/<model_name>/<dataset>/<k>shot/seed<s>/{config.json, metrics.json, table.md}
and skips a run whose metrics.json already exists (use --force to redo it). The results folder is
locked while a run uses it: a second run into it is refused, naming the holder.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.dataset import (AnomalyDataset, categories, check_test_split, load_image, load_meta, select_calibration,
                          select_k_shot)
from data.images import header_size
from methods import list_methods, resolve_method_config
from methods.base import InferenceOptions, Method
from methods.checkpoint import build_method, check_checkpoint_params, read_checkpoint
from models.backbones import PRECISIONS
from utils import distributed, report
from utils.calibration import Calibration, estimate, rates, score_images
from utils.cli import error_report, run_cli
from utils.config import (MethodConfig, TestConfig, as_json, differing_keys, effective_test_settings, parse_params,
                          precision_difference, resolve_device, to_dict, validate_test)
from utils.device import loader_options, synchronize, to_host
from utils.io import OutputError, atomic_write_json, check_writable, read_json
from utils.lock import RunLock
from utils.metrics import compute_category_metrics
from utils.peak_memory import peak_mib, reset_peak

log = logging.getLogger("fsad.test")


def _mask_size(root: Path, items: list[dict], eval_size: int) -> tuple[int, int]:
    """Evaluation resolution of a category: eval_size, or the images' own size when 0."""
    if eval_size:
        return eval_size, eval_size
    sizes = {header_size(root / it["img_path"])[::-1] for it in items}  # upright (H, W): EXIF orientation applied
    if len(sizes) != 1:
        raise ValueError(f"--eval-size 0 needs one image size per category; category "
                         f"'{items[0]['cls_name']}' has {sorted(sizes)[:4]}; pass --eval-size N instead")
    return sizes.pop()


def inference_options(cfg: TestConfig) -> InferenceOptions:
    return InferenceOptions(winmode=cfg.winmode, win_size=cfg.win_size, win_stride=cfg.win_stride,
                            win_weight=cfg.win_weight, image_index=cfg.image_index, precision=cfg.precision)


def image_names(img_paths: list[str]) -> list[str]:
    """Unique file stems for a category's images: the stem, prefixed with as many parent folder names
    as it takes to tell all of them apart (MVTec: good_000 and broken_large_000, not two 000)."""
    parts = [PurePosixPath(p).parent.parts + (PurePosixPath(p).stem,) for p in img_paths]
    longest = max((len(pp) for pp in parts), default=1)
    for depth in range(1, longest + 1):
        names = ["_".join(pp[-depth:]) for pp in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{n}_{i}" for i, n in enumerate(names)]


def save_category_images(run_dir: Path, cls: str, ds: AnomalyDataset, metrics: dict, labels: np.ndarray,
                         scores: np.ndarray, masks: np.ndarray, maps: np.ndarray, all_maps: np.ndarray,
                         has_mask: np.ndarray, cfg: TestConfig) -> None:
    """--save-images: panels of the most wrong images (the save_images highest-scoring normal and
    lowest-scoring anomalous ones; -1 = all) in run_dir/images/<cls>/, and the category's ROC/PR/PRO
    curves in run_dir/curves/ drawn from the arrays the metrics were computed on."""
    from utils.visualize import ColourScale, pick_images, save_curves, save_panel

    t = metrics.get("p_f1_threshold")
    t = float(t) if t is not None and np.isfinite(t) else None
    scale = ColourScale.for_threshold(t)
    n = len(labels) if cfg.save_images < 0 else cfg.save_images
    normal, anomalous = pick_images(labels, scores, n)
    names = image_names([it["img_path"] for it in ds.items])
    index = []  # which image each panel shows, for report.html
    for i in normal + anomalous:
        sample = ds[i]
        save_panel(run_dir / "images" / cls / f"{names[i]}.png", sample["image"], all_maps[i], scale,
                   sample["mask"].numpy() if has_mask[i] else None, t)
        index.append({"panel": f"images/{cls}/{names[i]}.png", "image": ds.items[i]["img_path"],
                      "label": "anomalous" if labels[i] else "normal", "score": float(scores[i])})
    atomic_write_json(run_dir / "images" / cls / report.PANELS_INDEX, index)
    save_curves(run_dir / "curves", cls, labels, scores, masks, maps, cfg.fpr_limit)


def calibrated_rates(cal: Calibration, labels: np.ndarray, raw_scores: np.ndarray, scores: np.ndarray,
                     masks: np.ndarray, maps: np.ndarray, metrics: dict) -> dict:
    """How thresholds chosen without labels do on the labelled test split, beside the F1-max thresholds
    that need the labels: the false-positive rate over normal test images (pixels) and the recall over
    anomalous images (defect pixels). The calibrated image threshold is on the per-photo score (what
    predict.py applies it to); F1-max's on the evaluation score (set-normalised for fdsl)."""
    out = {"calib_i_threshold": cal.image, "calib_p_threshold": cal.pixel}
    out["calib_i_fpr"], out["calib_i_recall"] = rates(labels, raw_scores >= cal.image)
    out["i_f1_fpr"], out["i_f1_recall"] = rates(labels, scores >= metrics["i_f1_threshold"])
    if masks.size:
        out["calib_p_fpr"], out["calib_p_recall"] = rates(masks, maps >= cal.pixel)
        p_thr = metrics.get("p_f1_threshold")
        if p_thr is not None and np.isfinite(p_thr):
            out["p_f1_fpr"], out["p_f1_recall"] = rates(masks, maps >= p_thr)
    return out


def evaluate_category(method: Method, cfg: TestConfig, root: Path, meta: dict, cls: str,
                      run_dir: Path | None = None) -> tuple[dict, dict]:
    refs = select_k_shot(meta, cls, cfg.k_shot, cfg.seed)
    ref_images = torch.stack([load_image(root / it["img_path"], method.image_size) for it in refs])
    reset_peak(method.device)
    state = method.fit(ref_images, [it["img_path"] for it in refs], cfg.batch_size, category=cls)

    items = meta["test"][cls]
    out_size = _mask_size(root, items, cfg.eval_size)
    ds = AnomalyDataset(root, "test", method.image_size, items=items, mask_size=cfg.eval_size or None)
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=False, **loader_options(cfg.workers, method.device))
    maps, raw_scores, masks, labels, has_mask = [], [], [], [], []
    t0 = time.perf_counter()
    for batch in tqdm(loader, desc=f"test {cls}", leave=False):
        m, s = method.predict(batch["image"].to(method.device, non_blocking=True), state, out_size)
        maps.append(to_host(m))  # queued copies: no wait for the GPU per batch
        raw_scores.append(to_host(s))
        masks.append(batch["mask"])
        labels.append(batch["label"])
        has_mask.append(batch["has_mask"])
    synchronize(method.device)  # the copies above are complete from here on
    seconds = time.perf_counter() - t0
    peak = peak_mib(method.device)
    maps_t = torch.cat(maps)
    scores = method.image_scores(torch.cat(raw_scores), maps_t)
    # image metrics over all images; pixel metrics over the images with a mask (normal ones count:
    # their mask is all zero), so an anomalous photo without a mask is not scored as defect-free
    masked = torch.cat(has_mask).numpy().astype(bool)
    labels_np, scores_np = torch.cat(labels).numpy(), scores.numpy()
    masks_np, maps_np = torch.cat(masks).numpy()[masked] > 0.5, maps_t.numpy()[masked]
    metrics = compute_category_metrics(labels_np, scores_np, masks_np, maps_np, fpr_limit=cfg.fpr_limit)
    calibration = None
    if cfg.calibrate:  # N normal train photos, not references, scored against the same references
        normal = select_calibration(meta, cls, refs, cfg.calibrate, cfg.seed)
        normal_images = torch.stack([load_image(root / it["img_path"], method.image_size) for it in normal])
        normal_maps, normal_scores = score_images(method, state, normal_images, out_size, cfg.batch_size)
        cal = estimate(normal_maps, normal_scores, [it["img_path"] for it in normal])
        metrics.update(calibrated_rates(cal, labels_np, torch.cat(raw_scores).float().numpy(), scores_np, masks_np,
                                        maps_np, metrics))
        calibration = {k: v for k, v in cal.as_dict().items() if k not in ("pixel", "image")}
    info = {"references": [it["img_path"] for it in refs], "n_test": len(items),
            "n_pixel_eval": int(masked.sum()), "n_missing_masks": int((~masked).sum()),
            "seconds_per_image": seconds / max(len(items), 1), "peak_memory_mib": peak,
            **method.state_info(state), **({"calibration": calibration} if calibration else {})}
    if cfg.save_images and run_dir is not None:
        save_category_images(run_dir, cls, ds, metrics, labels_np, scores_np, masks_np, maps_np,
                             maps_t.numpy(), masked, cfg)
    return metrics, info


def calibration_note(per_category: dict, info: dict) -> str | None:
    """The table's note of a --calibrate run: per category, image FPR on normal test photos and recall on
    defective ones at the calibrated threshold, beside the F1-max threshold's."""
    cats = [c for c in per_category if "calib_i_fpr" in per_category[c]]
    if not cats:
        return None
    n = info[cats[0]]["calibration"]["n_photos"]
    pct = lambda v: "n/a" if v is None or not np.isfinite(v) else f"{100 * v:.1f}%"  # noqa: E731
    return (f"Thresholds calibrated on {n} normal train photos besides the references (no labels), image "
            f"false-positive rate on normal test photos / recall on anomalous ones, vs. at the F1-max threshold "
            f"(needs labels): " + "; ".join(
                f"{c} {pct(per_category[c]['calib_i_fpr'])} / {pct(per_category[c]['calib_i_recall'])} vs. "
                f"{pct(per_category[c]['i_f1_fpr'])} / {pct(per_category[c]['i_f1_recall'])}" for c in cats) + ".")


def missing_masks_note(info: dict) -> str | None:
    """The table's note when anomalous images without a mask were left out of the pixel metrics."""
    missing = {c: i["n_missing_masks"] for c, i in info.items() if i.get("n_missing_masks")}
    if not missing:
        return None
    return ("Pixel metrics exclude anomalous images without a mask (image metrics use all images): " +
            ", ".join(f"{c} {n} of {info[c]['n_test']} (pixel metrics over {info[c]['n_pixel_eval']})"
                      for c, n in missing.items()) + ".")


# Settings that change numbers; a finished run with other values must not be taken as done.
RESULT_KEYS = ("data_root", "checkpoint", "method", "classes", "winmode", "win_size", "win_stride", "win_weight",
               "image_index", "eval_size", "fpr_limit", "backbone", "pretrained", "image_size", "precision", "params",
               "calibrate")


def stored_method(config: dict) -> str:
    """The method of a results folder's config.json (folders written before methods existed: fdsl)."""
    return config.get("method", {}).get("method", "fdsl") if isinstance(config.get("method"), dict) else "fdsl"


def requested_method(cfg: TestConfig) -> str:
    """The method this run evaluates: the checkpoint's, or --method for a training-free one."""
    if cfg.checkpoint:
        return read_checkpoint(cfg.checkpoint)["method"] if Path(cfg.checkpoint).is_file() else (cfg.method or "fdsl")
    if not cfg.method:
        raise ValueError(f"pass --checkpoint (a trained method) or --method for a training-free one "
                         f"(known methods: {', '.join(list_methods())})")
    return resolve_method_config(MethodConfig(name=cfg.method, params=cfg.params))["method"]


# What a refused results folder can be answered with, from test.py and from the launchers alike
REUSE_HINT = "use another model_name (test.py --model-name, launchers: their first argument)"


def _finished(run_dir: Path, cfg: TestConfig, method_name: str, training: tuple[dict, int] | None = None) -> bool:
    """`training`: (train_config, epoch) the checkpoint will hold once trained (launchers, before
    training); by default read from the checkpoint when it exists."""
    if not report.is_run_complete(run_dir):
        return False
    stored = read_json(run_dir / "config.json", "results config")
    if stored_method(stored) != method_name:
        raise ValueError(f"{run_dir} holds results of method '{stored_method(stored)}', not '{method_name}'; "
                         f"{REUSE_HINT}")
    # settings the winmode ignores are not compared (nan with other window sizes: the same numbers);
    # runs from before --precision existed were fp32, from before --param without parameters
    stored_test = {"precision": "fp32", "params": {}, "calibrate": 0, **stored.get("test", {})}
    current = {**to_dict(cfg), "precision": run_precision(cfg)}
    diff = differing_keys(effective_test_settings(stored_test), effective_test_settings(current), RESULT_KEYS)
    if training is None and cfg.checkpoint and Path(cfg.checkpoint).is_file():
        ckpt = read_checkpoint(cfg.checkpoint)
        training = ckpt.get("train_config", {}), ckpt["epoch"]
    if training is not None:  # heads retrained with other settings under the same path
        if as_json(training[0]) != stored.get("train") or training[1] != stored.get("checkpoint_epoch"):
            diff.append("the checkpoint's training")
    if "precision" in diff:
        diff[diff.index("precision")] = precision_difference(stored_test.get("precision"), current["precision"])
    if diff:
        raise ValueError(f"{run_dir} holds results of another configuration (differs in {', '.join(diff)}); "
                         f"{REUSE_HINT} or delete that folder to redo it")
    return True


def check_results_folder(cfg: TestConfig, training: tuple[dict, int] | None = None) -> bool:
    """The reuse check of `evaluate`, for launchers to call before any training: raises when the
    results folder holds another configuration; True when this run is already finished."""
    return _finished(results_dir(cfg), cfg, requested_method(cfg), training)


def run_precision(cfg: TestConfig) -> str:
    """The precision a run records: 'auto' made concrete for this process's device (bf16 on a recent
    GPU, fp32 on CPU), so a finished folder is compared with what this run would compute."""
    return distributed.run_precision(cfg.precision, cfg.device)


def model_name(cfg: TestConfig) -> str:
    """--model-name, else the method's name: a knn run without one lands in results/knn/..."""
    return cfg.model_name or requested_method(cfg)


def results_dir(cfg: TestConfig) -> Path:
    """The run's results folder, after checking the settings that name it (seed, k, ...)."""
    validate_test(cfg)
    if cfg.checkpoint:
        check_checkpoint_params(cfg.checkpoint, cfg.params)
    return report.run_dir(cfg.results_root, model_name(cfg), cfg.dataset, cfg.k_shot, cfg.seed)


def check_output(cfg: TestConfig, force: bool = False) -> bool:
    """Refuse a results folder that cannot be written, before any model is built. True when it cannot
    be written but holds this run finished already: nothing to write (e.g. a read-only archive)."""
    run_dir = results_dir(cfg)
    try:
        check_writable(run_dir, "results folder")
    except OutputError:
        if force or not _finished(run_dir, cfg, requested_method(cfg)):
            raise
        return True
    return False


@distributed.collective  # under torchrun: a rank that fails still joins the others' exchange
def evaluate(cfg: TestConfig, force: bool = False) -> Path:
    run_dir = results_dir(cfg)
    device = resolve_device(cfg.device)  # under torchrun this joins the process group
    # recorded resolved: the precision, not 'auto'; the folder name, not ''
    cfg = replace(cfg, precision=run_precision(cfg), model_name=model_name(cfg))
    method_name = requested_method(cfg)
    if check_output(cfg, force):
        log.info("already evaluated (read-only folder): %s", run_dir)
        return run_dir
    # one lock per run, held by rank 0 (the writer): other ranks would wait for each other's lock
    lock = RunLock(run_dir, "results folder", REUSE_HINT) if distributed.is_main() else contextlib.nullcontext()
    with lock:
        if not force and _finished(run_dir, cfg, method_name):
            log.info("already evaluated: %s", run_dir)
            if distributed.is_main() and not (run_dir / report.RUN_PAGE).is_file():
                report.write_run_page(run_dir)  # a run finished before report.html existed
            return run_dir
        return _evaluate_locked(cfg, run_dir, device)


def _evaluate_locked(cfg: TestConfig, run_dir: Path, device: torch.device) -> Path:
    root = Path(cfg.data_root)
    meta = load_meta(root)
    classes = categories(meta, cfg.classes, "test")
    check_test_split(meta, classes, root)
    for cls in classes:  # fail before any work when k (or k + --calibrate) is too large anywhere
        refs = select_k_shot(meta, cls, cfg.k_shot, cfg.seed)
        if cfg.calibrate:
            select_calibration(meta, cls, refs, cfg.calibrate, cfg.seed)
    shard = distributed.shard(classes, [len(meta["test"][c]) for c in classes], log)  # this rank's categories
    # from here on the run does real work: log.txt records it (rank 0's, the other ranks' lines
    # replayed into it), and the error that stops it
    handler = logging.FileHandler(run_dir / "log.txt", mode="w", encoding="utf-8") if shard.is_main \
        else logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)  # the run's log file is complete whatever the caller's logging setup
    try:
        torch.manual_seed(cfg.seed)
        method, ckpt = build_method(cfg.checkpoint, cfg.method, cfg.backbone, cfg.pretrained, cfg.image_size,
                                    device, cfg.params)
        method.configure(inference_options(cfg))
        per_category, info = {}, {}
        log.info("method %s, checkpoint %s (epoch %s), %d categories", method.name, cfg.checkpoint or "none",
                 ckpt["epoch"], len(classes))
        for cls in tqdm(shard, desc=f"{cfg.dataset} {cfg.k_shot}-shot seed {cfg.seed}"):
            per_category[cls], info[cls] = evaluate_category(method, cfg, root, meta, cls, run_dir)
            m = per_category[cls]
            log.info("%s: i-AUROC %.4f p-AUROC %.4f p-AUPRO %.4f, %.3f s/image, references %s", cls, m["i_auroc"],
                     m["p_auroc"], m["p_aupro"], info[cls]["seconds_per_image"], info[cls]["references"])
            if "calib_i_fpr" in m:
                log.info("%s: calibrated thresholds (image %.6g, pixel %.6g): image FPR %.4f, recall %.4f; at the "
                         "F1-max threshold: FPR %.4f, recall %.4f", cls, m["calib_i_threshold"],
                         m["calib_p_threshold"], m["calib_i_fpr"], m["calib_i_recall"], m["i_f1_fpr"],
                         m["i_f1_recall"])
        per_category, info = shard.gather(per_category, info)  # every rank's results; raises if one failed
        config = {"test": to_dict(cfg), "method": ckpt["method_config"], "backbones": ckpt["backbones"],
                  "checkpoint_epoch": ckpt["epoch"], "train": ckpt.get("train_config", {}),
                  "references": {c: info[c]["references"] for c in classes}}
        seconds = [info[c]["seconds_per_image"] for c in classes]
        # rank 0 writes; the others return once it has
        table = shard.write(report.write_run, run_dir, config, per_category,
                            extra={"seconds_per_image": float(np.mean(seconds)), "categories": info},
                            note=" ".join(n for n in (missing_masks_note(info), calibration_note(per_category, info))
                                          if n) or None)
    except BaseException as e:
        # straight to the file: the caller prints the error (run_cli) or shows the traceback
        handler.handle(logging.makeLogRecord({"msg": error_report(e), "levelno": logging.ERROR,
                                              "levelname": "ERROR"}))
        raise
    finally:
        shard.close()
        log.setLevel(level)
        log.removeHandler(handler)
        handler.close()
    if not shard.is_main:
        return run_dir
    page = report.write_run_page(run_dir)
    print(f"\n{cfg.model_name} | {cfg.dataset} | {cfg.k_shot}-shot | seed {cfg.seed}\n{table}\n-> {run_dir} "
          f"(page: {page.name})")
    return run_dir


def build_parser() -> argparse.ArgumentParser:
    d = TestConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="dataset folder holding meta.json (required)")
    p.add_argument("--dataset", default=d.dataset, help="name used in the results path (default: %(default)s)")
    p.add_argument("--checkpoint", default="", help="epoch_N.pth written by train.py (default: none, for "
                   "training-free methods)")
    p.add_argument("--method", default=None, help=f"one of {', '.join(list_methods())}; with --checkpoint it must "
                   f"be the checkpoint's method (default: the checkpoint's)")
    p.add_argument("--results-root", default=d.results_root, help="folder of all results (default: %(default)s)")
    p.add_argument("--model-name", default=d.model_name, help="results folder name (default: the method's name, "
                   f"e.g. {', '.join(list_methods())})")
    p.add_argument("--classes", nargs="*", default=None, help="categories to test (default: all)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=JSON", help="parameter of a training-free "
                   "method, e.g. --param top_percent=1, or a checkpoint's test-time parameter, e.g. fdsl's --param "
                   "bn_stats=reference --param fd_merge=0.75 (repeatable; a checkpoint's others are fixed by training; "
                   "default: the method config's)")
    p.add_argument("--backbone", default=None, help="backbone config(s), NAME or role=NAME,...: override the "
                   "checkpoint's (must match it) or choose a training-free method's (default: the checkpoint's, "
                   "else the method config's)")
    p.add_argument("--pretrained", default=None, help="weights tag or local file, same syntax, e.g. on another "
                   "machine (default: the checkpoint's, else the backbone config's)")
    p.add_argument("--image-size", type=int, default=None, help="input side in pixels (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=d.seed, help="picks the k-shot references; an integer >= 0 "
                   "(default: %(default)s)")
    p.add_argument("--k-shot", type=int, default=d.k_shot, help="normal reference images per category "
                   "(default: %(default)s)")
    p.add_argument("--winmode", default=d.winmode, choices=("nan", "mul", "onlywin"), help="nan: whole image; "
                   "mul: whole image blended with windows; onlywin: windows only (default: %(default)s)")
    p.add_argument("--win-size", type=int, default=d.win_size, help="window side in patches (default: %(default)s)")
    p.add_argument("--win-stride", type=int, default=d.win_stride, help="window stride in patches "
                   "(default: %(default)s)")
    p.add_argument("--win-weight", type=float, default=d.win_weight, help="weight w of the windows in mul: "
                   "(1 - w) * whole + w * windows (default: %(default)s)")
    p.add_argument("--image-index", default=d.image_index, choices=("off", "windows", "all"),
                   help="where matching uses only the most similar reference (image-feature index) "
                        "(default: %(default)s)")
    p.add_argument("--eval-size", type=int, default=d.eval_size, help="metric resolution; 0 = mask resolution "
                   "(default: %(default)s)")
    p.add_argument("--fpr-limit", type=float, default=d.fpr_limit, help="AUPRO integration limit "
                   "(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="test images per forward "
                   "(default: %(default)s)")
    p.add_argument("--save-images", type=int, default=d.save_images, metavar="N", help="per category, save "
                   "panels of the N highest-scoring normal and N lowest-scoring anomalous images to "
                   "<run>/images/<category>/ and the ROC/PR/PRO curves to <run>/curves/; -1 = all images, "
                   "0 = off (default: %(default)s)")
    p.add_argument("--calibrate", type=int, default=d.calibrate, metavar="N", help="also choose thresholds without "
                   "labels, on N normal train photos that are not references (as predict.py --calibrate), and report "
                   "the image false-positive rate on test/good and the recall on defective photos at them, beside "
                   "the F1-max threshold's; 0 = off (default: %(default)s)")
    p.add_argument("--device", default=d.device, help="cpu or a CUDA index; under torchrun: cpu, cuda (GPU = local "
                   "rank) or one index per process such as 0,1 (default: %(default)s)")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS, help="autocast of the frozen "
                   "backbones: auto = bf16 (fp16 on GPUs without bf16) on CUDA, fp32 on CPU; fp32 = off "
                   "(default: %(default)s)")
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader workers reading test images "
                   "(default: %(default)s)")
    p.add_argument("--force", action="store_true", help="redo a finished run, overwriting its results "
                   "(default: off)")
    return p


def parse_args(argv=None) -> tuple[TestConfig, bool]:
    p = build_parser()
    a = vars(p.parse_args(argv))
    force = a.pop("force")
    a["params"] = parse_params(a.pop("param"))
    return TestConfig(**a), force



def main(argv=None) -> int:
    return run_cli("test.py", lambda: evaluate(*parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
