"""Train a method's heads on an auxiliary dataset's test split (images with masks).

    python train.py --method fdsl --data-root DIR --dataset mvtec --out-dir results/fdsl/checkpoints/train_mvtec/seed0

Checkpoints `epoch_N.pth` are written after every epoch; a rerun resumes from the last readable one
(a damaged last epoch is redone, saying so) and does nothing when the last epoch exists. The folder is
locked while a run uses it: a second run into it is refused, naming the holder.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from data.dataset import (AnomalyDataset, categories, check_test_split, load_image, load_meta, make_augmentation,
                          select_k_shot)
from data.meta import missing_mask_items
from methods import METHODS, create_method, list_methods, resolve_method_config, training_references
from methods.base import Method
from methods.checkpoint import DamagedCheckpointError, check_backbones, checkpoint_payload, read_checkpoint
from models.backbones import PRECISIONS
from utils import distributed
from utils.cli import error_report, run_cli
from utils.config import (MethodConfig, TrainConfig, differing_keys, parse_params, precision_difference,  # noqa: F401
                          resolve_device, to_dict, validate_train)
from utils.device import to_device
from utils.io import atomic_torch_save, atomic_write_json, check_writable
from utils.lock import RunLock

log = logging.getLogger("fsad.train")


def checkpoint_path(out_dir: str | Path, epoch: int) -> Path:
    return Path(out_dir) / f"epoch_{epoch}.pth"


def epoch_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every epoch_N.pth in out_dir, newest first."""
    return sorted(((int(m.group(1)), p) for p in Path(out_dir).glob("epoch_*.pth")
                   if (m := re.fullmatch(r"epoch_(\d+)\.pth", p.name))), reverse=True)


def note(out_dir: Path, line: str) -> None:
    """A line in the checkpoint folder's train_log.txt, next to the per-epoch lines (rank 0 writes it)."""
    if not distributed.is_main():
        return
    try:
        with open(out_dir / "train_log.txt", "a", encoding="utf-8") as f:
            f.write(line.rstrip("\n") + "\n")
    except OSError as e:  # a full disk must not hide the error that is being logged
        log.warning("cannot write %s: %s", out_dir / "train_log.txt", e.strerror or e)


def last_good_checkpoint(out_dir: Path) -> tuple[int, Path | None, dict | None]:
    """The newest epoch whose checkpoint can be read. A damaged one (a crash or a full disk while it
    was copied) is skipped, saying so in the log and in train_log.txt; training redoes its epoch."""
    found = epoch_checkpoints(out_dir)
    for epoch, path in found:
        try:
            return epoch, path, read_checkpoint(path)
        except DamagedCheckpointError as e:
            older = next((p.name for n, p in found if n < epoch), None)
            msg = f"{e}; falling back to {older or 'epoch 0 (training starts over)'}"
            log.warning("%s", msg)
            note(out_dir, f"warning: {msg}")
    return 0, None, None


# Settings that change the trained heads: a checkpoint folder written with other values is not
# resumed or taken as finished (epochs may grow: that continues the same run).
TRAIN_KEYS = ("data_root", "classes", "method", "seed", "batch_size", "lr", "betas", "train_k_shot", "augment",
              "mosaic_p", "crop_p", "crop_plus", "max_steps", "precision")


def check_same_run(ckpt_path: Path, cfg: TrainConfig, method: str, ckpt: dict | None = None) -> dict:
    """The checkpoint, after checking it belongs to this configuration."""
    ckpt = read_checkpoint(ckpt_path) if ckpt is None else ckpt
    if ckpt["method"] != method:
        raise ValueError(f"{ckpt_path.parent} holds a training run of method '{ckpt['method']}', not "
                         f"'{method}'; use another out-dir (launchers: another model_name) or delete it")
    stored = {"precision": "fp32", **ckpt.get("train_config", {})}  # runs from before --precision were fp32
    current = {**to_dict(cfg), "precision": distributed.run_precision(cfg.precision, cfg.device)}
    diff = differing_keys(stored, current, TRAIN_KEYS)
    if "precision" in diff:
        diff[diff.index("precision")] = precision_difference(stored["precision"], current["precision"])
    if diff:
        raise ValueError(f"{ckpt_path.parent} holds a training run with other settings (differs in "
                         f"{', '.join(diff)}); use another out-dir (launchers: another model_name) or delete it")
    return ckpt


def fit_references(method: Method, root: Path, meta: dict, classes: list[str], k: int, seed: int) -> dict:
    """One reference state per category from k normal train images (fewer if the split is smaller)."""
    states = {}
    for cls in tqdm(classes, desc="reference banks", leave=False):
        n_train = sum(1 for it in meta["train"].get(cls, []) if not it.get("anomaly", 0))
        if n_train == 0:
            raise ValueError(f"category '{cls}' has no normal train images in {root / 'meta.json'}; "
                             f"references come from there (or leave the category out with --classes)")
        refs = select_k_shot(meta, cls, min(k, n_train), seed)
        images = torch.stack([load_image(root / it["img_path"], method.image_size) for it in refs])
        states[cls] = method.fit(images, [it["img_path"] for it in refs])
    return states


def resolve_training(cfg: TrainConfig) -> tuple[TrainConfig, dict]:
    """The run with the method's training defaults filled in (lr, betas) and its precision made
    concrete for this process's device ('auto' -> bf16 on a recent GPU, fp32 on CPU), and the
    method config: what the checkpoint records."""
    method_cfg = resolve_method_config(cfg.method)
    if not METHODS[method_cfg["method"]].trainable:
        raise ValueError(f"method '{method_cfg['method']}' is training-free: there is nothing to train; "
                         f"evaluate it directly with test.py --method {method_cfg['method']}")
    defaults = method_cfg.get("training", {})
    k, augment = training_references(method_cfg)
    cfg = replace(cfg, data_root=str(Path(cfg.data_root).resolve()),  # the same run, however spelled
                  train_k_shot=cfg.train_k_shot if cfg.train_k_shot is not None else k,
                  augment=cfg.augment if cfg.augment is not None else augment,
                  lr=cfg.lr if cfg.lr is not None else float(defaults.get("lr", 1e-3)),
                  betas=tuple(cfg.betas if cfg.betas is not None else defaults.get("betas", (0.9, 0.999))),
                  precision=distributed.run_precision(cfg.precision, cfg.device))
    return cfg, method_cfg


def check_training_masks(meta: dict, classes: list[str], dataset: str, root: Path) -> None:
    """Training learns from the test split's masks: an anomalous image without one (a meta.json
    marked "missing_masks") would teach "defect-free" on its defect pixels, so it is refused."""
    missing = missing_mask_items(meta, "test", classes)
    if missing:
        raise ValueError(f"dataset '{dataset}' ({root}) has {len(missing)} anomalous test image(s) without a mask "
                         f"(e.g. {missing[0]['img_path']}); training needs every defect mask: add the masks "
                         f"and re-index, or train on another dataset (test.py can evaluate it)")


OUT_DIR_HINT = "use another out-dir (launchers: another model_name)"


def check_output(cfg: TrainConfig) -> None:
    """Refuse an out-dir that cannot be written, before any model is built."""
    check_writable(cfg.out_dir, "checkpoint folder")


def train(cfg: TrainConfig) -> Path:
    validate_train(cfg)  # every numeric setting, before any model or folder
    device = resolve_device(cfg.device)
    cfg, method_cfg = resolve_training(cfg)
    check_output(cfg)
    # rank 0 (the writer) holds the lock; under torchrun a rank that fails stops them all
    lock = RunLock(cfg.out_dir, "checkpoint folder", OUT_DIR_HINT) if distributed.is_main() \
        else contextlib.nullcontext()
    with lock:
        return _train_locked(cfg, method_cfg, device)


def _train_locked(cfg: TrainConfig, method_cfg: dict, device) -> Path:
    out_dir = Path(cfg.out_dir)
    done, last, ckpt = last_good_checkpoint(out_dir)
    if ckpt is not None:
        check_same_run(last, cfg, method_cfg["method"], ckpt)
    if done >= cfg.epochs:
        wanted = checkpoint_path(out_dir, cfg.epochs)
        log.info("already trained: %s", wanted if wanted.is_file() else last)
        return wanted if wanted.is_file() else last
    root = Path(cfg.data_root)
    meta = load_meta(root)
    classes = categories(meta, cfg.classes, "test")
    check_test_split(meta, classes, root)  # the heads learn from the test split: an empty one teaches nothing
    check_training_masks(meta, classes, cfg.dataset, root)
    try:
        return _fit(cfg, method_cfg, device, out_dir, root, meta, classes, done, last, ckpt)
    except BaseException as e:
        note(out_dir, error_report(e))  # the log of a failed run says what stopped it
        raise


def _fit(cfg: TrainConfig, method_cfg: dict, device, out_dir: Path, root: Path, meta: dict, classes: list[str],
         done: int, last: Path | None, ckpt: dict | None) -> Path:
    torch.manual_seed(cfg.seed)  # head initialisation
    method = create_method(method_cfg, device)
    method.set_precision(cfg.precision)  # the frozen backbones only; the heads train in fp32
    optimizer = torch.optim.Adam(method.trainable_parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    if ckpt is not None:
        check_backbones(ckpt["backbones"], method, last)
        method.heads.load_state_dict(ckpt["state"])
        optimizer.load_state_dict(ckpt["optimizer"])
        log.info("resuming after epoch %d (%s)", done, last.name)
    step_loss = distributed.data_parallel(method, device, cfg.batch_size)  # method.loss, or DDP over the heads

    states = fit_references(method, root, meta, classes, cfg.train_k_shot, cfg.seed)
    dataset = AnomalyDataset(root, "test", method.image_size, classes, seed=cfg.seed,
                             augment=make_augmentation(cfg.augment, cfg.mosaic_p, cfg.crop_p, cfg.crop_plus))
    if distributed.is_main():  # one writer
        atomic_write_json(out_dir / "train_config.json", to_dict(cfg))
    method.train()
    for epoch in range(done, cfg.epochs):
        dataset.set_epoch(epoch)
        # this rank's share of the seeded shuffle (one process: the order it always had)
        loader = distributed.train_loader(dataset, cfg.batch_size, cfg.workers, cfg.seed * 100_003 + epoch, device)
        # losses summed on the device: reading each one (.item()) would wait for the GPU every step
        loss_sum, steps, t0 = torch.zeros((), dtype=torch.float64, device=device), 0, time.time()
        bar = tqdm(loader, desc=f"train {cfg.dataset} epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not distributed.is_main())
        for step, batch in enumerate(bar):
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
            batch = to_device(batch, device)
            loss = step_loss(batch, [states[c] for c in batch["cls_name"]])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            steps += 1
        mean_loss = distributed.mean_over_ranks(loss_sum, steps)  # the epoch's one host sync
        path = checkpoint_path(out_dir, epoch + 1)
        if distributed.is_main():  # one checkpoint, written by rank 0
            atomic_torch_save(path, checkpoint_payload(method, epoch + 1, optimizer, to_dict(cfg)))
            procs = f" processes {distributed.world_size()}" if distributed.launched() else ""
            note(out_dir, f"epoch {epoch + 1} loss {mean_loss:.6f} steps {steps} seconds {time.time() - t0:.1f}{procs}")
            log.info("epoch %d/%d loss %.4f -> %s", epoch + 1, cfg.epochs, mean_loss, path)
        distributed.barrier()  # no rank reads a checkpoint before rank 0 has written it
    return checkpoint_path(out_dir, cfg.epochs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainConfig()
    p.add_argument("--data-root", required=True, help="dataset folder holding meta.json (required)")
    p.add_argument("--dataset", default=d.dataset, help="name used in logs and folders (default: %(default)s)")
    p.add_argument("--out-dir", required=True, help="checkpoint folder; must be writable, one run at a time "
                   "(required)")
    p.add_argument("--classes", nargs="*", default=None, help="categories to train on (default: all)")
    p.add_argument("--method", default="fdsl", help=f"one of {', '.join(list_methods())} or a method JSON "
                   f"(default: %(default)s)")
    p.add_argument("--backbone", default=None, help="backbone config name(s): NAME replaces the method's first "
                   "backbone, role=NAME[,role=NAME] any (default: the method config's)")
    p.add_argument("--pretrained", default=None, help="weights tag or local file, same syntax ('none' = random; "
                   "default: each backbone config's)")
    p.add_argument("--image-size", type=int, default=None, help="input side in pixels (default: the backbone's)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=JSON",
                   help="method parameter override, e.g. --param use_nam=false (repeatable; default: none)")
    p.add_argument("--use-nam", type=int, choices=(0, 1), default=None,
                   help="fdsl: shorthand for --param use_nam (default: the method config's)")
    p.add_argument("--seed", type=int, default=d.seed, help="head initialisation, augmentation, shuffling and "
                   "the training references; an integer >= 0 (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs in total; a rerun with more continues "
                   "the same run (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step; under torchrun the "
                   "global batch, split evenly over the processes (default: %(default)s)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: the method config's)")
    p.add_argument("--train-k-shot", type=int, default=d.train_k_shot,
                   help="normal references per category while training (default: the method config's "
                   "training.train_k_shot, else 10; dcpsfr: 1)")
    p.add_argument("--augment", default=d.augment, choices=("mosaic", "crop", "none"),
                   help="training augmentation: mosaic (MVTec), crop (VisA) or none (default: the method config's "
                   "training.augment, else mosaic; dcpsfr: none)")
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader worker processes "
                   "(default: %(default)s)")
    p.add_argument("--device", default=d.device, help="cpu or a CUDA index; under torchrun: cpu, cuda (GPU = local "
                   "rank) or one index per process such as 0,1 (default: %(default)s)")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS, help="autocast of the frozen "
                   "backbones (the heads train in fp32): auto = bf16 (fp16 on GPUs without bf16) on CUDA, fp32 on "
                   "CPU; fp32 = off (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=None, help="batches per epoch, for smoke tests "
                   "(default: the whole epoch)")
    return p


def parse_args(argv=None) -> TrainConfig:
    p = build_parser()
    a = p.parse_args(argv)
    params = parse_params(a.param)
    if a.use_nam is not None:
        params["use_nam"] = bool(a.use_nam)
    method = MethodConfig(name=a.method, backbone=a.backbone, pretrained=a.pretrained, image_size=a.image_size,
                          params=params)
    return TrainConfig(data_root=a.data_root, dataset=a.dataset, out_dir=a.out_dir, method=method, classes=a.classes,
                       seed=a.seed, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, train_k_shot=a.train_k_shot,
                       augment=a.augment, workers=a.workers, device=a.device, max_steps=a.max_steps,
                       precision=a.precision)


def main(argv=None) -> int:
    return run_cli("train.py", lambda: print(train(parse_args(argv))))

if __name__ == "__main__":
    sys.exit(main())
