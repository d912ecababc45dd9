"""Score new photos against k normal reference photos of the same product.

    python predict.py --checkpoint CKPT --refs REF_DIR --images 'PHOTOS/*.png' --out OUT
    python predict.py --checkpoint CKPT --refs a.png b.png --images x.jpg --out OUT --threshold 0.5
    python predict.py --checkpoint CKPT --refs REF_DIR --images PHOTOS --out OUT \\
        --threshold-from results/NAME/DATASET/1shot/seed0 --category candle
    python predict.py --method knn --backbone tiny_clip --refs REF_DIR --images PHOTOS --out OUT  # training-free
    python predict.py --method anomalydino --category screw --refs REF_DIR --images PHOTOS --out OUT  # masks screws
    python predict.py --method knn --refs REF_DIR --calibrate NORMAL_DIR --images PHOTOS --out OUT  # thresholds

Writes to OUT, per query photo, <name>_overlay.png (the photo at its own size with the anomaly map
blended in) and, with a threshold, <name>_mask.png (white = map >= threshold); then predictions.csv
and predictions.json (highest score first, with the run's settings, skipped files and why), and
index.html: the same run as a page (thumbnails by score, flags, full-size overlay, mask and original).
<name> is the photo's file stem, prefixed with parent folder names when stems repeat, the same
number of folders for every photo of the run (good/000.png, crack/000.png -> good_000, crack_000).

Thresholds without labels: --calibrate NORMAL_PHOTOS (normal photos that are neither references nor
queries) scores them against the references and takes the image threshold (anomalous: score >=
the maximum of their scores, --image-percentile) and the pixel threshold (masks: the 99.9th
percentile of their pooled map values, --pixel-percentile) from them; the overlays' colour scale
then runs from the median normal pixel (bottom colour) through the pixel threshold (middle colour),
so normal regions are cold. Without --calibrate, 2 or more references give the same estimate by
leave-one-out (each scored against the others; weaker, and said so); --threshold and
--threshold-from override both. The rule and its reasons: utils/calibration.py.

Scores: `score` is the method's own per-photo score (`Method.predict`), which does not depend on
the other photos of the run. FDSL's evaluation score (test.py) additionally min-max normalises the
map maximum over all test photos of a category, so it is not computed here, and the image threshold
a results folder records for FDSL (on that set-relative scale) is not applied to it; see --help of
--threshold-from.
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.folder import is_image_file, list_image_files
from data.images import read_image
from data.photos import check_calibration_photos, check_output_folder, distinct_references, split_off_references
from methods import list_methods, load_method_config
from methods.base import InferenceOptions, Method
from methods.checkpoint import build_method, read_checkpoint
from utils.calibration import (CALIBRATION, DEFAULT_IMAGE_PERCENTILE, DEFAULT_PIXEL_PERCENTILE, LEAVE_ONE_OUT,
                               Calibration, check_percentile, estimate, leave_one_out, score_images)
from utils.cli import run_cli
from utils.config import IMAGE_INDEX, PRECISIONS, WINMODES, check_image_size, parse_params, resolve_device
from utils.html import predictions_page
from utils.io import atomic_write_json, atomic_write_text, read_json
from utils.visualize import DEFAULT_ALPHA, DEFAULT_COLORMAP, ColourScale, binary_mask, overlay, save_png

SUMMARY = "predictions.json"
TABLE = "predictions.csv"
PAGE = "index.html"
# test.py run settings that change a map's values (k_shot: the number of references)
RUN_SETTINGS = ("k_shot", "winmode", "win_size", "win_stride", "win_weight", "image_index")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# --------------------------------------------------------------------------- #
# inputs
# --------------------------------------------------------------------------- #
def collect_images(specs: list[str], what: str) -> list[Path]:
    """Folders (their images, by name), globs (matching image files, sorted) and single files (as
    given, any extension), in the order given, each file once. Every spec must yield an image, so a
    typo among several is not silently dropped."""
    out, seen = [], set()
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = list_image_files(p)
            if not found:
                raise ValueError(f"no {what} image in folder {p} (any format Pillow opens: .png, .jpg, .bmp, "
                                 f".tif, ...)")
        elif p.is_file():
            found = [p]
        elif glob.has_magic(spec):
            found = sorted((Path(m) for m in glob.glob(spec, recursive=True) if is_image_file(Path(m))),
                           key=lambda q: q.as_posix())
            if not found:
                raise ValueError(f"no {what} image matched {spec!r}")
        else:
            raise FileNotFoundError(f"{what} image or folder not found: {p}")
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


def output_names(paths: list[Path]) -> list[str]:
    """Unique file-name stems for the outputs: the stem, prefixed with as many parent folder names as it
    takes to tell all photos apart, the same number for every photo (so good/004.png is good_004 next
    to good_000, not a bare 004), then a counter as the last resort."""
    parts = [[*p.resolve().parent.parts[1:], p.stem] for p in paths]
    depth = 1
    while True:
        names = ["_".join(pp[-depth:]) for pp in parts]
        if len(set(names)) == len(names) or depth >= max(len(pp) for pp in parts):
            break
        depth += 1
    used: dict[str, int] = {}
    out = []
    for n in names:
        used[n] = used.get(n, 0) + 1
        out.append(n if used[n] == 1 else f"{n}_{used[n]}")
    return out


def parse_number(text, what: str) -> float:
    """A finite number, or ValueError naming the value (and where it came from)."""
    if isinstance(text, bool):
        raise ValueError(f"{what} must be a number, got {text!r}")
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {text!r}")
    return value


# --------------------------------------------------------------------------- #
# thresholds
# --------------------------------------------------------------------------- #
@dataclass
class Threshold:
    pixel: float | None = None  # masks: map >= pixel
    image: float | None = None  # `anomalous`: score >= image; None -> map_max >= pixel
    source: str = "none"  # "given", or the metrics.json it was read from
    category: str | None = None
    rule: str = ""  # the `anomalous` rule, in words
    warnings: list[str] = field(default_factory=list)
    run_config: dict | None = None  # the threshold run's config.json, to compare settings with
    calibration: Calibration | None = None  # the normal range measured by --calibrate or leave-one-out

    def as_dict(self) -> dict:
        return {"pixel": self.pixel, "image": self.image, "source": self.source, "category": self.category,
                "anomalous_rule": self.rule, "warnings": self.warnings,
                "calibration": None if self.calibration is None else self.calibration.as_dict()}


NO_THRESHOLD_HINT = ("no threshold: one reference gives no estimate of the normal range; pass --calibrate "
                     "NORMAL_PHOTOS (normal photos that are neither references nor queries), or 2 or more "
                     "references (leave-one-out), or --threshold T")


def from_calibration(cal: Calibration) -> Threshold:
    """The run's threshold from a measured normal range (source 'calibration' or the leave-one-out one)."""
    return Threshold(pixel=cal.pixel, image=cal.image, source=cal.source, rule=cal.rule, calibration=cal)


def set_relative(method: Method | type[Method]) -> bool:
    """True when the method's final image score (image_scores) is computed over a set of photos, so a
    threshold on it does not apply to one photo's own score."""
    cls = method if isinstance(method, type) else type(method)
    return cls.image_scores is not Method.image_scores


def read_threshold(source: str, category: str | None, method_cls: type[Method]) -> Threshold:
    """p_f1_threshold (masks) and, where it is on the per-photo scale, i_f1_threshold (the anomalous
    column) of one category of a finished test.py run (a results folder or its metrics.json)."""
    path = Path(source)
    metrics_path = path / "metrics.json" if path.is_dir() else path
    if not metrics_path.is_file():
        raise FileNotFoundError(f"--threshold-from {source}: no metrics.json there (pass a finished test.py "
                                f"results folder, e.g. results/NAME/DATASET/1shot/seed0)")
    data = read_json(metrics_path, "results file")
    per_cat = data.get("per_category") if isinstance(data, dict) else None
    if not isinstance(per_cat, dict) or not per_cat:
        raise ValueError(f"{metrics_path} has no per_category results (not a test.py metrics.json)")
    if category is None:
        if len(per_cat) > 1:
            raise ValueError(f"{metrics_path} holds {len(per_cat)} categories; pick one with --category "
                             f"({', '.join(sorted(per_cat))})")
        category = next(iter(per_cat))
    elif category not in per_cat:
        raise ValueError(f"--category {category!r} is not in {metrics_path}; it has {', '.join(sorted(per_cat))}")
    m = per_cat[category]
    if not isinstance(m, dict):
        raise ValueError(f"{metrics_path}: per_category[{category!r}] is not an object")

    def number(key: str) -> float:
        return parse_number(m.get(key), f"{metrics_path}: per_category[{category!r}][{key!r}]")

    t = Threshold(pixel=number("p_f1_threshold"), source=str(metrics_path), category=category)
    config_path = metrics_path.parent / "config.json"
    if config_path.is_file():
        t.run_config = read_json(config_path, "results config")
        method_cfg = t.run_config.get("method")
        stored = method_cfg.get("method", "fdsl") if isinstance(method_cfg, dict) else "fdsl"
        if stored != method_cls.name:
            raise ValueError(f"{metrics_path} holds thresholds of method '{stored}', but this run uses "
                             f"'{method_cls.name}'; a threshold only means something on its own method's scale")
    else:
        t.warnings.append(f"{config_path} not found: the run's method and settings could not be checked")
    if set_relative(method_cls):
        t.rule = (f"map_max >= {t.pixel:.6g} (p_f1_threshold); the run's i_f1_threshold is on method "
                  f"{method_cls.name}'s set-normalised evaluation score, not on the per-photo score")
    else:
        t.image = number("i_f1_threshold")
        t.rule = f"score >= {t.image:.6g} (i_f1_threshold)"
    return t


def settings_differences(run_config: dict, method: Method, settings: dict, checkpoint: str) -> list[str]:
    """What differs between the threshold's run and this one among the things that move map values:
    the effective backbones, weights and input size, the checkpoint, k and the window settings."""
    diff = []
    run = run_config.get("test") if isinstance(run_config.get("test"), dict) else {}
    diff += [k for k in RUN_SETTINGS if k in run and run[k] != settings[k]]
    stored = run_config.get("method") if isinstance(run_config.get("method"), dict) else {}
    for key in ("backbones", "image_size"):
        if key in stored and stored[key] != method.config.get(key):
            diff.append(key)
    params = [k for k in method.config if k not in ("method", "backbones", "image_size", "training", "description")]
    changed = [k for k in params if k in stored and stored[k] != method.config[k]]
    if changed:
        diff.append(f"method parameters ({', '.join(changed)})")
    ck = run.get("checkpoint") or ""
    if "checkpoint" in run and (bool(ck) != bool(checkpoint)
                                or (ck and Path(ck).resolve() != Path(checkpoint).resolve())):
        diff.append(f"checkpoint ({ck or 'none'})")
    return diff


# --------------------------------------------------------------------------- #
# the method
# --------------------------------------------------------------------------- #
def method_class(args) -> type[Method]:
    """The method a run will use, known before any model is built (to check a threshold file first)."""
    from methods import METHODS

    if args.checkpoint:
        name = readable_checkpoint(args.checkpoint)["method"]
    elif args.method:
        name = load_method_config(args.method)["method"]
    else:
        raise ValueError(f"pass --checkpoint (a trained method) or --method for a training-free one "
                         f"(known methods: {', '.join(list_methods())})")
    return METHODS[name]


def readable_checkpoint(path: str) -> dict:
    """read_checkpoint, with a file torch cannot unpickle reported as a bad value, not a traceback."""
    try:
        return read_checkpoint(path)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as e:  # unpickling, a truncated zip, a foreign file: all mean "not a checkpoint"
        raise ValueError(f"cannot read checkpoint {path}: {_one_line(e)}") from e


def inference_options(args) -> InferenceOptions:
    if args.winmode not in WINMODES or args.image_index not in IMAGE_INDEX:  # argparse checks; callers may not
        raise ValueError(f"winmode must be one of {WINMODES} and image-index one of {IMAGE_INDEX}")
    if not 0.0 <= args.win_weight <= 1.0:
        raise ValueError(f"--win-weight must be in [0, 1], got {args.win_weight}")
    if args.win_size < 1 or args.win_stride < 1:
        raise ValueError(f"--win-size and --win-stride must be >= 1, got {args.win_size}, {args.win_stride}")
    return InferenceOptions(winmode=args.winmode, win_size=args.win_size, win_stride=args.win_stride,
                            win_weight=args.win_weight, image_index=args.image_index,
                            precision=args.precision)


def _tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def read_stack(paths: list[Path], size: int) -> torch.Tensor:
    """The photos squashed to size x size, as one (N, 3, size, size) tensor; an unreadable one is an error."""
    return torch.stack([_tensor(read_image(p, size)[0]) for p in paths])


def fit_references(method: Method, paths: list[Path], batch_size: int, category: str | None = None):
    """The reference state from the k photos, read in batches (an unreadable reference is an error:
    without it the run would silently use fewer references than asked); `category` names the product."""
    return method.fit(read_stack(paths, method.image_size), [str(p) for p in paths], batch_size, category=category)


def calibrate(method: Method, state, photos: list[Path], args) -> Calibration:
    """The normal range of `photos` scored against the fitted references (maps at the input size, so
    every photo weighs the same in the pixel percentile). An unreadable photo is an error: the
    threshold would silently rest on fewer photos than given."""
    size = method.image_size
    maps, scores = [], []
    for s in range(0, len(photos), args.batch_size):
        m, sc = score_images(method, state, read_stack(photos[s:s + args.batch_size], size), (size, size),
                             args.batch_size)
        maps.append(m)
        scores.append(sc)
    return estimate(np.concatenate(maps), np.concatenate(scores), [str(p) for p in photos], source=CALIBRATION,
                    pixel_percentile=args.pixel_percentile, image_percentile=args.image_percentile)


def calibrate_leave_one_out(method: Method, refs: list[Path], args, category: str | None) -> Calibration:
    size = method.image_size
    maps, scores = leave_one_out(method, read_stack(refs, size), [str(p) for p in refs], (size, size),
                                 args.batch_size, category)
    return estimate(maps, scores, [str(p) for p in refs], source=LEAVE_ONE_OUT,
                    pixel_percentile=args.pixel_percentile, image_percentile=args.image_percentile)


# --------------------------------------------------------------------------- #
# the run
# --------------------------------------------------------------------------- #
def _clear_previous(out: Path) -> None:
    """Remove the pictures an earlier run listed in OUT's summary, so no stale mask survives a rerun
    without a threshold. Only files that summary names are touched."""
    try:
        old = read_json(out / SUMMARY, "summary").get("predictions", [])
    except (FileNotFoundError, ValueError, AttributeError):
        return
    for row in old if isinstance(old, list) else []:
        for key in ("overlay", "mask"):
            name = row.get(key) if isinstance(row, dict) else None
            if isinstance(name, str) and name.endswith(".png") and Path(name).name == name:
                (out / name).unlink(missing_ok=True)


def _write_table(path: Path, rows: list[dict], columns: list[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def predict(args) -> Path:
    options = inference_options(args)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_image_size(args.image_size)
    if args.threshold is not None and args.threshold_from:
        raise ValueError("--threshold and --threshold-from exclude each other: give a value or a results folder")
    params = parse_params(args.param)
    check_percentile(args.pixel_percentile, "--pixel-percentile")
    check_percentile(args.image_percentile, "--image-percentile")
    check_output_folder(args.out, args.refs, args.images, args.calibrate or [])  # writable, no input reads it back
    refs = distinct_references(collect_images(args.refs, "reference"))
    queries, skipped = split_off_references(collect_images(args.images, "query"), refs)  # a reference: not scored
    normal = collect_images(args.calibrate, "calibration") if args.calibrate else []
    check_calibration_photos(normal, refs, queries)
    cls = method_class(args)
    if args.category and not args.threshold_from and not hasattr(cls, "masks_category"):
        raise ValueError(f"--category picks the category of --threshold-from (and for knn/anomalydino the product, "
                         f"which decides their masking); it has no use for {cls.name} without --threshold-from")
    if args.threshold is not None:
        t = parse_number(args.threshold, "--threshold")
        threshold = Threshold(pixel=t, source="given", rule=f"map_max >= {t:.6g} (the mask is not empty)")
    elif args.threshold_from:
        threshold = read_threshold(args.threshold_from, args.category, cls)
    else:
        threshold = Threshold(rule="no threshold: no masks, no anomalous column" if normal or len(refs) >= 2
                              else NO_THRESHOLD_HINT)

    device = resolve_device(args.device)
    torch.manual_seed(0)  # random-init parts are seeded by their configs; this fixes anything else
    method, ckpt = build_method(args.checkpoint, args.method, args.backbone, args.pretrained, args.image_size,
                                device, params)
    method.configure(options)
    if threshold.run_config is not None:
        settings = {"k_shot": len(refs), **{k: getattr(options, k) for k in RUN_SETTINGS if k != "k_shot"}}
        diff = settings_differences(threshold.run_config, method, settings, args.checkpoint)
        if diff:
            threshold.warnings.append(f"the threshold's run differs in {', '.join(diff)}: this run's maps may be "
                                      f"on another scale")
    for w in threshold.warnings:
        print(f"predict.py: warning: {w}", file=sys.stderr)
    category = args.category or threshold.category
    state = fit_references(method, refs, args.batch_size, category)
    measured = None
    if normal:
        measured = calibrate(method, state, normal, args)
    elif len(refs) >= 2 and threshold.source == "none":
        measured = calibrate_leave_one_out(method, refs, args, category)
    if measured is not None and threshold.source == "none":
        threshold = from_calibration(measured)
        scale = measured.colour_scale(args.colormap)
    else:  # given or read: it overrides a calibration, which is still recorded beside it
        threshold.calibration = measured
        scale = ColourScale.for_threshold(threshold.pixel, args.colormap)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _clear_previous(out)
    names = output_names(queries)
    rows = []
    bar = tqdm(total=len(queries), desc="predict", unit="image")
    for start in range(0, len(queries), args.batch_size):
        loaded = []
        for path, name in zip(queries[start:start + args.batch_size], names[start:start + args.batch_size]):
            try:
                arr, (w, h) = read_image(path, method.image_size)
            except (ValueError, OSError) as e:  # one bad photo must not cost the others their results
                skipped.append({"image": str(path), "reason": _one_line(e)})
                continue
            loaded.append((path, name, _tensor(arr), (h, w)))
        # one predict per photo size, so every map is upsampled once, straight to its photo's size
        by_size: dict[tuple[int, int], list] = {}
        for entry in loaded:
            by_size.setdefault(entry[3], []).append(entry)
        for hw, group in by_size.items():
            with torch.no_grad():
                maps, scores = method.predict(torch.stack([g[2] for g in group]).to(device), state, hw)
            for (path, name, _, _), amap, score in zip(group, maps.float().cpu().numpy(), scores.float().cpu()):
                rows.append(_write_outputs(out, path, name, amap, float(score), threshold, scale, args.alpha))
        bar.update(min(args.batch_size, len(queries) - start))
    bar.close()
    if not rows:
        raise ValueError(f"none of the {len(queries)} query image(s) could be read (first: {skipped[0]['image']}: "
                         f"{skipped[0]['reason']})")
    for s in skipped:
        print(f"predict.py: skipped {s['image']}: {s['reason']}", file=sys.stderr)
    rows.sort(key=lambda r: (-r["score"], r["image"]))
    columns = ["image", "score", "map_max"] + (["anomalous"] if threshold.pixel is not None else []) \
        + ["width", "height", "overlay"] + (["mask"] if threshold.pixel is not None else [])
    _write_table(out / TABLE, rows, columns)
    n_anomalous = sum(r["anomalous"] for r in rows) if threshold.pixel is not None else None
    summary = {
        "method": method.name,
        "checkpoint": args.checkpoint or None,
        "checkpoint_epoch": ckpt.get("epoch"),
        "backbones": {role: spec.get("config") for role, spec in method.config.get("backbones", {}).items()},
        "image_size": method.image_size,
        "inference": {**asdict(options), "precision": method.precision},  # resolved: not 'auto'
        "device": str(device),
        "batch_size": args.batch_size,
        "references": [str(p) for p in refs],
        "category": category,
        "method_parameters": params,
        "score": ("the method's per-photo score (Method.predict); independent of the other photos"
                  + (f"; {method.name}'s evaluation score in test.py also min-max normalises the map maximum "
                     f"over the scored set, which a single photo has not" if set_relative(method) else "")),
        "threshold": threshold.as_dict(),
        "colour_scale": {**scale.as_dict(), "alpha": args.alpha},
        "counts": {"queries": len(rows) + len(skipped), "scored": len(rows), "skipped": len(skipped),
                   "anomalous": n_anomalous},
        "skipped": skipped,
        "predictions": rows,
    }
    atomic_write_json(out / SUMMARY, summary)
    write_page(out, summary)
    if n_anomalous is None:
        flagged = f"; {NO_THRESHOLD_HINT}" if threshold.rule == NO_THRESHOLD_HINT else ""
    elif threshold.source == LEAVE_ONE_OUT:
        flagged = (f", {n_anomalous} anomalous (score >= {threshold.image:.6g}, thresholds from the references, "
                   f"leave-one-out: weaker than --calibrate NORMAL_PHOTOS)")
    elif threshold.source == CALIBRATION:
        flagged = (f", {n_anomalous} anomalous (score >= {threshold.image:.6g}, thresholds from calibration on "
                   f"{len(threshold.calibration.photos)} normal photo(s))")
    else:
        flagged = f", {n_anomalous} anomalous ({threshold.rule})"
    print(f"scored {len(rows)} image(s){flagged}; skipped {len(skipped)}; wrote {out / TABLE}, {out / SUMMARY} "
          f"and {out / PAGE}")
    return out


def _relative(path: str, folder: Path) -> str | None:
    try:
        return os.path.relpath(Path(path).resolve(), folder.resolve())
    except ValueError:  # another drive (Windows): no relative link exists
        return None


def write_page(out: Path, summary: dict) -> Path:
    """index.html from the dict written to predictions.json, the originals linked relative to it."""
    originals = [_relative(r["image"], out) for r in summary["predictions"]]
    return atomic_write_text(out / PAGE, predictions_page(summary, originals))


def _write_outputs(out: Path, path: Path, name: str, amap: np.ndarray, score: float, threshold: Threshold,
                   scale: ColourScale, alpha: float) -> dict:
    photo, _ = read_image(path, None)
    row = {"image": str(path), "score": score, "map_max": float(amap.max()),
           "width": int(amap.shape[1]), "height": int(amap.shape[0]), "overlay": f"{name}_overlay.png"}
    save_png(out / row["overlay"], overlay(photo, amap, scale, alpha))
    if threshold.pixel is not None:
        row["mask"] = f"{name}_mask.png"
        save_png(out / row["mask"], binary_mask(amap, threshold.pixel).astype(np.uint8) * 255)
        row["anomalous"] = bool(score >= threshold.image if threshold.image is not None
                                else row["map_max"] >= threshold.pixel)
    return row


def parse_args(argv=None) -> argparse.Namespace:
    d = InferenceOptions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="", help="epoch_N.pth written by train.py (not for training-free methods)")
    p.add_argument("--method", default=None, help=f"one of {', '.join(list_methods())}; with --checkpoint it must be "
                   f"the checkpoint's (default: the checkpoint's)")
    p.add_argument("--refs", nargs="+", required=True, metavar="DIR_OR_FILE",
                   help="the k normal reference photos: a folder (all its images) or files")
    p.add_argument("--images", nargs="+", required=True, metavar="DIR_GLOB_OR_FILE",
                   help="photos to score: folders, globs (quote them: 'dir/*.png', ** recurses) or files")
    p.add_argument("--out", required=True,
                   help="output folder (created; pictures of an earlier run there are replaced); not an input folder, "
                        "nor one an input glob reaches")
    p.add_argument("--threshold", default=None, metavar="T",
                   help="map threshold: masks are map >= T, a photo is anomalous when its map maximum is >= T")
    p.add_argument("--threshold-from", default=None, metavar="RESULTS_RUN_DIR",
                   help="a finished test.py results folder: its p_f1_threshold for the masks and its "
                        "i_f1_threshold for the anomalous column, where that is on the per-photo scale (knn, "
                        "subspacead, dcpsfr); for fdsl, whose evaluation score is set-normalised, a photo is anomalous when "
                        "its map maximum reaches p_f1_threshold")
    p.add_argument("--calibrate", nargs="+", default=None, metavar="DIR_GLOB_OR_FILE",
                   help="normal photos, neither references nor queries, that set the thresholds and the colour "
                        "scale without labels: they are scored against the references, and the image threshold "
                        "and pixel threshold are percentiles of their scores and map values (see "
                        "--image-percentile, --pixel-percentile); --threshold and --threshold-from override")
    p.add_argument("--image-percentile", type=float, default=DEFAULT_IMAGE_PERCENTILE, metavar="P",
                   help="image threshold: this percentile of the normal photos' scores (default: %(default)s, their "
                        "maximum: a new normal photo exceeds it with chance about 1/(N+1))")
    p.add_argument("--pixel-percentile", type=float, default=DEFAULT_PIXEL_PERCENTILE, metavar="P",
                   help="pixel threshold (masks, the colour scale's middle): this percentile of the normal photos' "
                        "pooled map values (default: %(default)s)")
    p.add_argument("--category", default=None, help="the category of --threshold-from when the run has several; "
                   "for knn and anomalydino also the product, which decides whether test patches are "
                   "foreground-masked (anomalydino: capsule, screw, ... see its mask_categories)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=JSON", help="parameter of a training-free "
                   "method, e.g. --param masking=off (repeatable; default: the method config's)")
    p.add_argument("--backbone", default=None, help="backbone config(s), NAME or role=NAME,...: must match the "
                   "checkpoint's, or choose a training-free method's")
    p.add_argument("--pretrained", default=None, help="weights tag or local file, same syntax")
    p.add_argument("--image-size", type=int, default=None, help="input side in pixels (default: the checkpoint's); "
                   "every photo is squashed to this square, as in training")
    p.add_argument("--winmode", default=d.winmode, choices=WINMODES, help="LFE windows (fdsl, knn, anomalydino): nan, mul, onlywin")
    p.add_argument("--win-size", type=int, default=d.win_size, help="window side in patches")
    p.add_argument("--win-stride", type=int, default=d.win_stride, help="window stride in patches")
    p.add_argument("--win-weight", type=float, default=d.win_weight)
    p.add_argument("--image-index", default=d.image_index, choices=IMAGE_INDEX,
                   help="where matching uses only the most similar reference")
    p.add_argument("--batch-size", type=int, default=8, help="photos per forward pass")
    p.add_argument("--device", default="cpu", help="cpu or a CUDA index (default: %(default)s)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="autocast of the frozen backbones: "
                   "auto = bf16 (fp16 on GPUs without bf16) on CUDA, fp32 on CPU; fp32 = off (default: %(default)s)")
    p.add_argument("--colormap", default=DEFAULT_COLORMAP, help="matplotlib colormap of the overlays")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="weight of the heatmap over the photo")
    return p.parse_args(argv)


def main(argv=None) -> int:
    def work():
        args = parse_args(argv)
        if not 0.0 <= args.alpha <= 1.0:
            raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
        predict(args)

    return run_cli("predict.py", work)


if __name__ == "__main__":
    sys.exit(main())
