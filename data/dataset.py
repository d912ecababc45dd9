"""Reading a dataset through its meta.json, k-shot reference sampling and training augmentations.

Images are squashed to size x size (no centre crop), masks the same way, so a map always lines
up with its mask, also for VisA's non-square photos. Pixel values are in [0, 1]; each backbone
applies its own mean/std. Which image modes are read and how (16-bit, palette, alpha, non-zero
masks) is in data/images.py.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from data.images import read_image, read_mask, size_mismatch
from data.meta import DatasetError, leaves_root, validate_meta
from utils.io import read_json

SPLITS = ("train", "test")


def load_meta(root: str | Path) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root} (set the dataset path argument or "
                                f"environment variable to a folder that holds meta.json)")
    path = root / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; write it first with "
                                f"`python data/mvtec.py --root {root}` (or data/visa.py for VisA)")
    meta = read_json(path, "dataset index")
    try:
        validate_meta(meta)
    except DatasetError as e:
        raise ValueError(f"{path}: {e} (rewrite it with data/mvtec.py or data/visa.py)") from e
    return meta


def categories(meta: dict, wanted: Sequence[str] | None = None, split: str = "test") -> list[str]:
    known = sorted(meta[split])
    if not wanted:
        return known
    twice = sorted({c for c in wanted if list(wanted).count(c) > 1})
    if twice:  # a category named twice would be evaluated (or trained on) twice
        raise ValueError(f"--classes names {', '.join(repr(c) for c in twice)} more than once; name each category once")
    unknown = [c for c in wanted if c not in known]
    if unknown:
        raise ValueError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                         f"the dataset's {split} split has {known}")
    return list(wanted)


def _category_seed(seed: int, cls_name: str) -> int:
    # Stable across processes and Python versions (unlike hash()).
    return (int(seed) * 1_000_003 + zlib.crc32(cls_name.encode())) % 2**32


def select_k_shot(meta: dict, cls_name: str, k: int, seed: int) -> list[dict]:
    """k normal references of a category, drawn without replacement from the distinct images of its train
    split.

    The draw depends only on (seed, category, k, the sorted train list), so every run with the
    same seed and k uses the same references.
    """
    if k < 1:
        raise ValueError(f"k-shot must be >= 1, got {k}")
    # one entry per image: a path listed twice must not be drawn as two references of one shot
    distinct = {it["img_path"]: it for it in meta["train"].get(cls_name, []) if not it.get("anomaly", 0)}
    items = sorted(distinct.values(), key=lambda it: it["img_path"])
    if k > len(items):
        raise ValueError(f"k-shot {k} is larger than the {len(items)} normal train images of category "
                         f"'{cls_name}'; use k <= {len(items)}")
    rng = np.random.default_rng(_category_seed(seed, cls_name))
    return [items[i] for i in sorted(rng.choice(len(items), size=k, replace=False))]


def select_calibration(meta: dict, cls_name: str, references: Sequence[dict], n: int, seed: int) -> list[dict]:
    """n normal train images of a category that are not among `references` (select_k_shot's), drawn
    without replacement by (seed, category): the normal photos a run calibrates its thresholds on."""
    if n < 1:
        raise ValueError(f"--calibrate must be >= 1 photo, got {n}")
    taken = {it["img_path"] for it in references}
    distinct = {it["img_path"]: it for it in meta["train"].get(cls_name, [])
                if not it.get("anomaly", 0) and it["img_path"] not in taken}
    items = sorted(distinct.values(), key=lambda it: it["img_path"])
    if n > len(items):
        raise ValueError(f"--calibrate {n} needs {n} normal train images of category '{cls_name}' besides its "
                         f"{len(taken)} reference(s); it has {len(items)}: use --calibrate <= {len(items)}")
    rng = np.random.default_rng(_category_seed(seed, cls_name) ^ 0x5EED_CA1B)
    return [items[i] for i in sorted(rng.choice(len(items), size=n, replace=False))]


def check_test_split(meta: dict, classes: Sequence[str], root: str | Path) -> None:
    """Refuse, before any work, a run with no category or a category whose test split is empty (it has no
    image to score: no metric exists for it)."""
    where = Path(root) / "meta.json"
    if not classes:
        raise ValueError(f"{where} has no category in its test split; index the dataset again")
    empty = [c for c in classes if not meta["test"].get(c)]
    if empty:
        raise ValueError(f"categor{'y' if len(empty) == 1 else 'ies'} {', '.join(repr(c) for c in empty)} "
                         f"{'has' if len(empty) == 1 else 'have'} no test image in {where}; add test images and index "
                         f"again, or leave {'it' if len(empty) == 1 else 'them'} out with --classes")


def _image(path: Path, size: int | None) -> tuple[torch.Tensor, tuple[int, int]]:
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path} (listed in meta.json; regenerate meta.json if "
                                f"the dataset moved)")
    arr, wh = read_image(path, size)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), wh


def _mask(path: Path, size: int | None) -> tuple[torch.Tensor, tuple[int, int]]:
    if not path.is_file():
        raise FileNotFoundError(f"mask not found: {path} (listed in meta.json for an anomalous image)")
    arr, wh = read_mask(path, size)
    return torch.from_numpy(arr.astype(np.float32)), wh


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """(3, size, size) float RGB in [0, 1]; unreadable files and unsupported modes raise ValueError
    naming the file."""
    return _image(Path(path), size)[0]


def load_mask(path: str | Path | None, size: int | None, fallback_hw: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """(H, W) float mask in {0, 1}, 1 where the file is non-zero; `size` None keeps the file's resolution."""
    if not path:
        hw = (size, size) if size else fallback_hw
        return torch.zeros(hw)
    return _mask(Path(path), size)[0]


class AnomalyDataset(torch.utils.data.Dataset):
    """Items of one split (all or some categories) as dicts of tensors and strings."""

    def __init__(self, root: str | Path, split: str, size: int, classes: Sequence[str] | None = None,
                 items: Sequence[dict] | None = None, augment: Callable | None = None,
                 mask_size: int | None | str = "same", seed: int = 0):
        self.root = Path(root)
        self.size = size
        self.mask_size = size if mask_size == "same" else mask_size
        if items is None:
            meta = load_meta(root)
            items = [it for c in categories(meta, classes, split) for it in meta[split][c]]
        self.items = list(items)
        self.augment = augment
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Augmentations draw from (seed, epoch, index): the same with any number of workers and
        after a resume."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def _path(self, item: dict, key: str) -> Path:
        # Items may come from the caller rather than a validated meta.json.
        if leaves_root(item[key]):
            raise ValueError(f"{item['img_path']!r}: {key} {item[key]!r} leaves the dataset root {self.root}")
        return self.root / item[key]

    def load(self, item: dict) -> tuple[torch.Tensor, torch.Tensor]:
        img_path = self._path(item, "img_path")
        mask_path = self._path(item, "mask_path") if item.get("mask_path") else None
        # an anomalous item without a mask (meta "missing_masks"): an all-zero mask, has_mask False
        img, img_wh = _image(img_path, self.size)
        if mask_path is None:
            hw = (self.mask_size, self.mask_size) if self.mask_size else (img_wh[1], img_wh[0])
            return img, torch.zeros(hw)
        mask, mask_wh = _mask(mask_path, self.mask_size)
        # Checked on the files' own sizes: resizing both to one size would hide a misaligned pair.
        if mask_wh != img_wh:
            raise ValueError(size_mismatch(mask_path, mask_wh, img_path, img_wh))
        return img, mask

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        img, mask = self.load(item)
        if self.augment is not None:
            img, mask = self.augment(self, i, img, mask, np.random.default_rng((self.seed, self.epoch, i)))
        return {"image": img, "mask": mask, "label": int(mask.max() > 0.5 or item.get("anomaly", 0)),
                "has_mask": bool(item.get("mask_path")) or not item.get("anomaly", 0),
                "cls_name": item["cls_name"], "img_path": item["img_path"]}


class Mosaic:
    """MVTec training augmentation: with probability p, a 2x2 mosaic of four random images of the
    same category (this sample included), masks assembled the same way."""

    def __init__(self, p: float = 0.3):
        self.p = p
        self._by_class: dict[int, dict[str, list[int]]] = {}

    def __call__(self, ds: AnomalyDataset, i: int, img, mask, rng: np.random.Generator):
        if rng.random() >= self.p:
            return img, mask
        by_class = self._by_class.setdefault(id(ds), _index_by_class(ds.items))
        pool = by_class[ds.items[i]["cls_name"]]
        picks = [i] + list(rng.choice(pool, size=3, replace=True))
        tiles = [ds.load(ds.items[j]) if j != i else (img, mask) for j in picks]
        half_img = [torch.nn.functional.interpolate(t[0][None], size=(ds.size // 2,) * 2, mode="bilinear",
                                                    align_corners=False, antialias=True)[0] for t in tiles]
        half_mask = [torch.nn.functional.interpolate(t[1][None, None], size=(ds.size // 2,) * 2,
                                                     mode="nearest")[0, 0] for t in tiles]
        img = torch.cat([torch.cat(half_img[:2], 2), torch.cat(half_img[2:], 2)], 1)
        mask = torch.cat([torch.cat(half_mask[:2], 1), torch.cat(half_mask[2:], 1)], 0)
        return _fit(img, ds.size), _fit(mask[None], ds.size, "nearest")[0]


class DefectCrop:
    """VisA training augmentation: with probability p, zoom into a random crop resized back to
    full size. Anomalous images: the crop contains defect pixels; with probability `plus` it is
    the small crop (50/518 of the side), else the large one (100/518). Normal images: the large
    crop with probability 1/2. The crop centre is drawn from the defect pixels, so no retry loop."""

    def __init__(self, p: float = 0.6, plus: float = 0.6, small: float = 50 / 518, large: float = 100 / 518):
        self.p, self.plus, self.small, self.large = p, plus, small, large

    def __call__(self, ds: AnomalyDataset, i: int, img, mask, rng: np.random.Generator):
        if rng.random() >= self.p:
            return img, mask
        H, W = mask.shape
        defect = mask > 0.5
        if not defect.any():
            if rng.random() < 0.5:
                return img, mask
            side = max(2, round(self.large * H))
            y0, x0 = (int(rng.integers(0, n - side + 1)) for n in (H, W))
        else:
            side = max(2, round((self.small if rng.random() < self.plus else self.large) * H))
            ys, xs = torch.nonzero(defect, as_tuple=True)
            j = int(rng.integers(len(ys)))
            # any crop position that keeps the chosen defect pixel inside
            y0 = int(rng.integers(max(0, ys[j] - side + 1), min(int(ys[j]), H - side) + 1))
            x0 = int(rng.integers(max(0, xs[j] - side + 1), min(int(xs[j]), W - side) + 1))
        img = img[:, y0:y0 + side, x0:x0 + side]
        mask = mask[y0:y0 + side, x0:x0 + side]
        return _fit(img, ds.size), _fit(mask[None], ds.size, "nearest")[0]


def _fit(t: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    if t.shape[-2:] == (size, size):
        return t
    kw = {"align_corners": False} if mode == "bilinear" else {}
    return torch.nn.functional.interpolate(t[None], size=(size, size), mode=mode, **kw)[0]


def _index_by_class(items: Sequence[dict]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for j, it in enumerate(items):
        out.setdefault(it["cls_name"], []).append(j)
    return out


AUGMENTATIONS = {"none": None, "mosaic": Mosaic, "crop": DefectCrop}


def make_augmentation(name: str, mosaic_p: float = 0.3, crop_p: float = 0.6, crop_plus: float = 0.6):
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation '{name}', expected one of {sorted(AUGMENTATIONS)}")
    if name == "mosaic":
        return Mosaic(mosaic_p)
    if name == "crop":
        return DefectCrop(crop_p, crop_plus)
    return None
