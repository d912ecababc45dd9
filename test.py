"""Evaluate trained FDSL heads k-shot on a dataset's test split.

    python test.py --data-root DIR --dataset visa --checkpoint CKPT --k-shot 1 --seed 0

Writes results/<model_name>/<dataset>/<k>shot/seed<s>/{config.json, metrics.json, table.md}
and skips a run whose metrics.json already exists (use --force to redo it).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.dataset import AnomalyDataset, categories, load_image, load_meta, select_k_shot
from models.detector import FDSLDetector, final_image_scores, load_detector, read_checkpoint
from models.lfe import WindowScorer, blend
from utils import report
from utils.cli import run_cli
from utils.config import TestConfig, as_json, differing_keys, resolve_device, to_dict, validate_test
from utils.io import read_json
from utils.metrics import compute_category_metrics

log = logging.getLogger("fdsl.test")


def _mask_size(root: Path, items: list[dict], eval_size: int) -> tuple[int, int]:
    """Evaluation resolution of a category: eval_size, or the images' own size when 0."""
    if eval_size:
        return eval_size, eval_size
    sizes = set()
    for it in items:
        with Image.open(root / it["img_path"]) as im:
            sizes.add((im.size[1], im.size[0]))
    if len(sizes) != 1:
        raise ValueError(f"--eval-size 0 needs one image size per category; category "
                         f"'{items[0]['cls_name']}' has {sorted(sizes)[:4]}; pass --eval-size N instead")
    return sizes.pop()


def make_window_scorer(detector: FDSLDetector, cfg: TestConfig):
    if cfg.winmode == "nan":
        return None
    return WindowScorer(detector, cfg.win_size, cfg.win_stride, use_image_index=cfg.image_index != "off")


def evaluate_category(detector: FDSLDetector, cfg: TestConfig, root: Path, meta: dict, cls: str) -> tuple[dict, dict]:
    device = detector.backbone.mean.device
    refs = select_k_shot(meta, cls, cfg.k_shot, cfg.seed)
    ref_images = torch.stack([load_image(root / it["img_path"], detector.image_size) for it in refs])
    bank = detector.build_bank(ref_images, [it["img_path"] for it in refs], cfg.batch_size)
    windows = make_window_scorer(detector, cfg)
    if windows is not None:
        windows.build_bank(ref_images)

    items = meta["test"][cls]
    out_size = _mask_size(root, items, cfg.eval_size)
    ds = AnomalyDataset(root, "test", detector.image_size, items=items, mask_size=cfg.eval_size or None)
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=False)
    maps, head_scores, masks, labels = [], [], [], []
    t0 = time.perf_counter()
    for batch in tqdm(loader, desc=f"test {cls}", leave=False):
        images = batch["image"].to(device)
        whole_map = whole_score = None
        if cfg.winmode != "onlywin":  # the whole-image result would be discarded by blend
            whole_map, whole_score = detector.predict_whole(images, bank, out_size,
                                                            use_image_index=cfg.image_index == "all")
        if windows is None:
            m, s = whole_map, whole_score
        else:
            win_map, win_score = windows.predict(images, out_size)
            m, s = blend(cfg.winmode, cfg.win_weight, whole_map, whole_score, win_map, win_score)
        maps.append(m.cpu())
        head_scores.append(s.cpu())
        masks.append(batch["mask"])
        labels.append(batch["label"])
    seconds = time.perf_counter() - t0
    maps_t = torch.cat(maps)
    scores = final_image_scores(torch.cat(head_scores), maps_t.flatten(1).amax(1))
    metrics = compute_category_metrics(torch.cat(labels).numpy(), scores.numpy(), torch.cat(masks).numpy() > 0.5,
                                       maps_t.numpy(), fpr_limit=cfg.fpr_limit)
    info = {"references": [it["img_path"] for it in refs], "n_test": len(items),
            "seconds_per_image": seconds / max(len(items), 1), "bank_bytes": bank.nbytes()}
    if windows is not None:
        info["window_bank_bytes"] = windows.bank_bytes()
    return metrics, info


# Settings that change numbers; a finished run with other values must not be taken as done.
RESULT_KEYS = ("data_root", "checkpoint", "classes", "winmode", "win_size", "win_stride", "win_weight",
               "image_index", "eval_size", "fpr_limit", "backbone", "pretrained", "image_size")


def _finished(run_dir: Path, cfg: TestConfig) -> bool:
    if not report.is_run_complete(run_dir):
        return False
    stored = read_json(run_dir / "config.json", "results config")
    diff = differing_keys(stored.get("test", {}), to_dict(cfg), RESULT_KEYS)
    if Path(cfg.checkpoint).is_file():  # heads retrained with other settings under the same path
        ckpt = read_checkpoint(cfg.checkpoint)
        if as_json(ckpt.get("train_config", {})) != stored.get("train") \
                or ckpt["epoch"] != stored.get("checkpoint_epoch"):
            diff.append("the checkpoint's training")
    if diff:
        raise ValueError(f"{run_dir} holds results of another configuration (differs in {', '.join(diff)}); "
                         f"use another model_name or --force to overwrite")
    return True


def evaluate(cfg: TestConfig, force: bool = False) -> Path:
    validate_test(cfg)
    run_dir = report.run_dir(cfg.results_root, cfg.model_name, cfg.dataset, cfg.k_shot, cfg.seed)
    if not force and _finished(run_dir, cfg):
        log.info("already evaluated: %s", run_dir)
        return run_dir
    device = resolve_device(cfg.device)
    root = Path(cfg.data_root)
    meta = load_meta(root)
    classes = categories(meta, cfg.classes, "test")
    for cls in classes:  # fail before any work when k is too large anywhere
        select_k_shot(meta, cls, cfg.k_shot, cfg.seed)
    torch.manual_seed(cfg.seed)
    detector, ckpt = load_detector(cfg.checkpoint, device, cfg.backbone, cfg.pretrained, cfg.image_size)
    per_category, info = {}, {}
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "log.txt", mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)  # the run's log file is complete whatever the caller's logging setup
    try:
        log.info("checkpoint %s (epoch %s), %d categories", cfg.checkpoint, ckpt["epoch"], len(classes))
        for cls in tqdm(classes, desc=f"{cfg.dataset} {cfg.k_shot}-shot seed {cfg.seed}"):
            per_category[cls], info[cls] = evaluate_category(detector, cfg, root, meta, cls)
            m = per_category[cls]
            log.info("%s: i-AUROC %.4f p-AUROC %.4f p-AUPRO %.4f, %.3f s/image, references %s", cls, m["i_auroc"],
                     m["p_auroc"], m["p_aupro"], info[cls]["seconds_per_image"], info[cls]["references"])
    finally:
        log.setLevel(level)
        log.removeHandler(handler)
        handler.close()
    config = {"test": to_dict(cfg), "model": ckpt["model_config"], "backbone": ckpt["backbone"],
              "checkpoint_epoch": ckpt["epoch"], "train": ckpt.get("train_config", {}),
              "references": {c: info[c]["references"] for c in classes}}
    seconds = [info[c]["seconds_per_image"] for c in classes]
    table = report.write_run(run_dir, config, per_category,
                             extra={"seconds_per_image": float(np.mean(seconds)), "categories": info})
    print(f"\n{cfg.model_name} | {cfg.dataset} | {cfg.k_shot}-shot | seed {cfg.seed}\n{table}\n-> {run_dir}")
    return run_dir


def parse_args(argv=None) -> tuple[TestConfig, bool]:
    d = TestConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="dataset folder holding meta.json")
    p.add_argument("--dataset", default=d.dataset, help="name used in the results path")
    p.add_argument("--checkpoint", required=True, help="epoch_N.pth written by train.py")
    p.add_argument("--results-root", default=d.results_root)
    p.add_argument("--model-name", default=d.model_name)
    p.add_argument("--classes", nargs="*", default=None)
    p.add_argument("--backbone", default=None, help="override the checkpoint's backbone config (must match it)")
    p.add_argument("--pretrained", default=None, help="weights tag or local file, e.g. on another machine")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--k-shot", type=int, default=d.k_shot)
    p.add_argument("--winmode", default=d.winmode, choices=("nan", "mul", "onlywin"))
    p.add_argument("--win-size", type=int, default=d.win_size, help="window side in patches")
    p.add_argument("--win-stride", type=int, default=d.win_stride, help="window stride in patches")
    p.add_argument("--win-weight", type=float, default=d.win_weight)
    p.add_argument("--image-index", default=d.image_index, choices=("off", "windows", "all"),
                   help="where matching uses only the most similar reference (image-feature index)")
    p.add_argument("--eval-size", type=int, default=d.eval_size, help="metric resolution; 0 = mask resolution")
    p.add_argument("--fpr-limit", type=float, default=d.fpr_limit, help="AUPRO integration limit")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--device", default=d.device, help="cpu or a CUDA index")
    p.add_argument("--force", action="store_true", help="redo a finished run")
    a = vars(p.parse_args(argv))
    force = a.pop("force")
    return TestConfig(**a), force


def main(argv=None) -> int:
    return run_cli("test.py", lambda: evaluate(*parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
