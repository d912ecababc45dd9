"""Pictures of anomaly maps: heatmap overlays, evaluation panels, metric curves, and which images
are worth a picture.

Colour: one `ColourScale` per run, never a per-image stretch. Stretching each map to its own
[min, max] paints the faint noise of a normal image as hot as a real defect; with one scale a
colour means the same map value in every picture. Without a threshold the scale is the fixed
[0, 1] of a probability map; with one, the threshold sits at the colormap's midpoint (0 -> bottom
colour, threshold -> middle, 1 -> top), so "above the middle colour" reads "above threshold". A
calibrated run (utils/calibration.py) uses `ColourScale.centred`: the median normal pixel at the
bottom, the calibrated threshold at the middle, on the method's own range.

Curves are drawn from the exact points of utils/metrics.py (`roc_curve`, `pr_curve`, `pro_curve`),
so a plot's area is the number in metrics.json. matplotlib draws through its Agg canvas only
(no pyplot, no global backend), which works on machines without a display and in threads.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from utils.io import atomic_write_bytes
from utils.metrics import pr_curve, pro_curve, roc_curve

DEFAULT_COLORMAP = "jet"  # the colormap of most anomaly-detection papers, so pictures compare at a glance
DEFAULT_ALPHA = 0.5  # weight of the heatmap over the photo
PANEL_GAP = 4  # pixels between panel tiles
PANEL_HEADER = 16  # pixels above the tiles for their titles
PANEL_BACKGROUND = 48  # grey of gaps, header and "n/a" tiles
CURVE_SIZE = (4.8, 4.0)  # inches; at CURVE_DPI a curve PNG is 480 x 400 pixels
CURVE_DPI = 100


def _colormap(name: str):
    import matplotlib

    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise ValueError(f"unknown colormap {name!r}; any matplotlib colormap name works, e.g. jet, turbo, "
                         f"inferno") from None


@dataclass(frozen=True)
class ColourScale:
    """Map value -> colour, the same for every image of a run.

    Linear from vmin (bottom colour) to vmax (top colour); with vcenter, two linear pieces that put
    vcenter at the middle colour. Values outside [vmin, vmax] take the end colours.
    """
    vmin: float = 0.0
    vmax: float = 1.0
    vcenter: float | None = None
    colormap: str = DEFAULT_COLORMAP

    def __post_init__(self):
        ends = (self.vmin, self.vmax) + (() if self.vcenter is None else (self.vcenter,))
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in ends):
            raise ValueError(f"colour scale needs finite numbers, got {self}")
        if not self.vmin < self.vmax:
            raise ValueError(f"colour scale needs vmin < vmax, got {self.vmin}, {self.vmax}")
        if self.vcenter is not None and not self.vmin < self.vcenter < self.vmax:
            raise ValueError(f"colour scale centre {self.vcenter} must lie strictly between {self.vmin} and "
                             f"{self.vmax}")
        _colormap(self.colormap)

    @classmethod
    def for_threshold(cls, threshold: float | None, colormap: str = DEFAULT_COLORMAP) -> "ColourScale":
        """[0, 1] with the threshold at the midpoint; [0, 1] plain without a usable threshold.

        A threshold of 1 or more (possible for knn's 1 - cosine maps) widens the top to 2 x threshold,
        so the upper half still has room; a threshold <= 0 marks every pixel and has no midpoint."""
        if threshold is None or not threshold > 0:
            return cls(0.0, 1.0, None, colormap)
        return cls(0.0, 1.0 if threshold < 1.0 else 2.0 * float(threshold), float(threshold), colormap)

    @classmethod
    def centred(cls, floor: float, threshold: float, colormap: str = DEFAULT_COLORMAP) -> "ColourScale":
        """floor -> bottom colour, threshold -> middle, threshold + (threshold - floor) -> top: the scale of
        a calibrated run (utils/calibration.py), on the method's own range whatever it is. A floor not
        below the threshold (constant normal maps) gets a small span below it instead."""
        floor, threshold = float(floor), float(threshold)
        span = threshold - floor
        if not span > 0:
            span = max(abs(threshold), 1.0) * 1e-3
        return cls(threshold - span, threshold + span, threshold, colormap)

    def normalise(self, values) -> np.ndarray:
        """Values -> [0, 1] positions on the colormap."""
        v = np.asarray(values, dtype=np.float64)
        if self.vcenter is None:
            t = (v - self.vmin) / (self.vmax - self.vmin)
        else:
            below = 0.5 * (v - self.vmin) / (self.vcenter - self.vmin)
            above = 0.5 + 0.5 * (v - self.vcenter) / (self.vmax - self.vcenter)
            t = np.where(v <= self.vcenter, below, above)
        return np.clip(t, 0.0, 1.0)

    def colours(self, values) -> np.ndarray:
        """(..., 3) uint8 RGB; a 256-entry table keeps big maps cheap (no float RGBA per pixel)."""
        table = np.round(_colormap(self.colormap)(np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)
        return table[np.round(self.normalise(values) * 255).astype(np.intp)]

    def as_dict(self) -> dict:
        return asdict(self)


def _numpy(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def to_uint8_rgb(image) -> np.ndarray:
    """(H, W, 3) uint8 from an (H, W, 3) or (3, H, W) image, float in [0, 1] or uint8."""
    a = _numpy(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3) or (3, H, W), got shape {a.shape}")
    if a.dtype == np.uint8:
        return a
    return np.round(np.clip(a, 0.0, 1.0) * 255).astype(np.uint8)


def resize_map(amap, hw: tuple[int, int]) -> np.ndarray:
    """(h, w) map -> (H, W) float32, bilinear (the map is a smooth field, not labels)."""
    a = _numpy(amap).astype(np.float32, copy=False)
    if a.ndim != 2:
        raise ValueError(f"expected an (H, W) anomaly map, got shape {a.shape}")
    if a.shape == tuple(hw):
        return a
    t = torch.from_numpy(np.ascontiguousarray(a))[None, None]
    return F.interpolate(t, size=tuple(hw), mode="bilinear", align_corners=False)[0, 0].numpy()


def resize_mask(mask, hw: tuple[int, int]) -> np.ndarray:
    """(h, w) mask -> (H, W) bool, nearest (labels must stay 0/1)."""
    m = _numpy(mask)
    m = m if m.dtype == bool else m > 0.5
    if m.shape == tuple(hw):
        return m
    small = Image.fromarray(m.astype(np.uint8) * 255)
    return np.asarray(small.resize((hw[1], hw[0]), Image.NEAREST)) > 0


def overlay(image, amap, scale: ColourScale, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """The photo with the map blended in, (H, W, 3) uint8 at the photo's own size; the map is
    resized to it (bilinear) when its size differs."""
    rgb = to_uint8_rgb(image)
    heat = scale.colours(resize_map(amap, rgb.shape[:2]))
    mixed = (1.0 - alpha) * rgb.astype(np.float32) + alpha * heat.astype(np.float32)
    return np.round(mixed).astype(np.uint8)


def binary_mask(amap, threshold: float) -> np.ndarray:
    """Pixels with value >= threshold (the convention of utils.metrics: predicted at or above)."""
    return _numpy(amap) >= threshold


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def save_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    """uint8 (H, W) or (H, W, 3) array -> PNG, written atomically."""
    return atomic_write_bytes(path, png_bytes(np.ascontiguousarray(array)))


# --------------------------------------------------------------------------- #
# evaluation panel: image | ground truth | heatmap | thresholded mask
# --------------------------------------------------------------------------- #
def _fit_side(hw: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    h, w = hw
    if not max_side or max(h, w) <= max_side:
        return h, w
    f = max_side / max(h, w)
    return max(1, round(h * f)), max(1, round(w * f))


def _grey_tile(hw: tuple[int, int]) -> np.ndarray:
    return np.full((*hw, 3), PANEL_BACKGROUND, np.uint8)


def panel(image, amap, scale: ColourScale, gt_mask=None, threshold: float | None = None,
          max_side: int | None = 512, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """Four tiles side by side under a title strip, each at the image's size (shrunk so its longer
    side is at most max_side; None keeps it). gt_mask None (unknown) and threshold None give grey
    tiles titled n/a; a normal image's ground truth is an all-zero mask, a black tile.

    Size: (PANEL_HEADER + h, 4 * w + 3 * PANEL_GAP) for the tile size (h, w)."""
    rgb = to_uint8_rgb(image)
    hw = _fit_side(rgb.shape[:2], max_side)
    if hw != rgb.shape[:2]:
        rgb = np.asarray(Image.fromarray(rgb).resize((hw[1], hw[0]), Image.BICUBIC))
    amap = resize_map(amap, hw)
    white = lambda m: np.repeat((m.astype(np.uint8) * 255)[..., None], 3, axis=2)  # noqa: E731
    tiles = [(rgb, "image"),
             (white(resize_mask(gt_mask, hw)), "ground truth") if gt_mask is not None
             else (_grey_tile(hw), "ground truth n/a"),
             (overlay(rgb, amap, scale, alpha), "heatmap"),
             (white(binary_mask(amap, threshold)), f"map >= {threshold:.4g}") if threshold is not None
             else (_grey_tile(hw), "no threshold")]
    h, w = hw
    out = np.full((PANEL_HEADER + h, 4 * w + 3 * PANEL_GAP, 3), PANEL_BACKGROUND, np.uint8)
    canvas = Image.fromarray(out)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, (tile, title) in enumerate(tiles):
        x = i * (w + PANEL_GAP)
        canvas.paste(Image.fromarray(tile), (x, PANEL_HEADER))
        draw.text((x + 2, 2), title, fill=(235, 235, 235), font=font)  # clipped by the canvas on tiny tiles
    return np.asarray(canvas)


def save_panel(path: str | os.PathLike, image, amap, scale: ColourScale, gt_mask=None,
               threshold: float | None = None, max_side: int | None = 512) -> Path:
    return save_png(path, panel(image, amap, scale, gt_mask, threshold, max_side))


# --------------------------------------------------------------------------- #
# which images to save when the number of pictures is bounded
# --------------------------------------------------------------------------- #
def pick_images(labels, scores, n: int) -> tuple[list[int], list[int]]:
    """Indices of the n highest-scoring normal and the n lowest-scoring anomalous images: where the
    model is most wrong, the pictures worth looking at. Most wrong first; equal scores keep index
    order, so the choice is reproducible."""
    if n < 0:
        raise ValueError(f"number of images to pick must be >= 0, got {n}")
    y = np.asarray(labels).ravel().astype(bool)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in size: {y.shape} vs {s.shape}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; every image needs a score to be ranked")
    normal, anomalous = np.flatnonzero(~y), np.flatnonzero(y)
    worst_normal = normal[np.argsort(-s[normal], kind="stable")][:n]
    worst_anomalous = anomalous[np.argsort(s[anomalous], kind="stable")][:n]
    return worst_normal.tolist(), worst_anomalous.tolist()


# --------------------------------------------------------------------------- #
# ROC, PR and PRO curves of one category
# --------------------------------------------------------------------------- #
def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) / 2.0)


def _figure(title: str, xlabel: str, ylabel: str, xmax: float = 1.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=CURVE_SIZE, dpi=CURVE_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, xlim=(0.0, xmax), ylim=(0.0, 1.02))
    ax.grid(alpha=0.3)
    return fig, ax


def _save_figure(fig, ax, path: Path) -> Path:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "undefined: one class only", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=CURVE_DPI)  # no bbox_inches: the PNG keeps its fixed size
    return atomic_write_bytes(path, buf.getvalue())


def save_curves(out_dir: str | os.PathLike, name: str, image_labels, image_scores, pixel_masks=None,
                pixel_maps=None, fpr_limit: float = 0.3) -> dict[str, Path]:
    """<name>_roc.png (image and pixel ROC), <name>_pr.png (both PR) and <name>_pro.png (PRO up to
    fpr_limit) in out_dir; pixel curves need (N, H, W) masks and maps at the evaluation resolution,
    as compute_category_metrics gets them. Legends carry the area of each drawn curve."""
    out_dir = Path(out_dir)
    levels = [("image", image_labels, image_scores)]
    if pixel_masks is not None and pixel_maps is not None:
        levels.append(("pixel", _numpy(pixel_masks) > 0.5, _numpy(pixel_maps)))
    paths = {}
    fig, ax = _figure(f"{name}: ROC", "false positive rate", "true positive rate")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    for level, labels, scores in levels:
        curve = roc_curve(labels, scores)
        if curve is not None:
            ax.plot(*curve, lw=1.5, label=f"{level} AUROC {_trapezoid(*curve):.2%}")
    paths["roc"] = _save_figure(fig, ax, out_dir / f"{name}_roc.png")
    fig, ax = _figure(f"{name}: precision-recall", "recall", "precision")
    for level, labels, scores in levels:
        curve = pr_curve(labels, scores)
        if curve is not None:
            recall, precision = curve
            ap = float(np.sum(np.diff(recall) * precision[1:]))
            ax.step(recall, precision, where="pre", lw=1.5, label=f"{level} AP {ap:.2%}")
    paths["pr"] = _save_figure(fig, ax, out_dir / f"{name}_pr.png")
    fig, ax = _figure(f"{name}: PRO up to FPR {fpr_limit:g}", "false positive rate (pixels)",
                      "per-region overlap", xmax=fpr_limit)
    if len(levels) > 1:
        curve = pro_curve(levels[1][1], levels[1][2], fpr_limit)
        if curve is not None:
            ax.plot(*curve, lw=1.5, label=f"AUPRO@{fpr_limit:g} {_trapezoid(*curve) / fpr_limit:.2%}")
    paths["pro"] = _save_figure(fig, ax, out_dir / f"{name}_pro.png")
    return paths


__all__ = ["ColourScale", "DEFAULT_ALPHA", "DEFAULT_COLORMAP", "binary_mask", "overlay", "panel", "pick_images",
           "png_bytes", "resize_map", "resize_mask", "save_curves", "save_panel", "save_png", "to_uint8_rgb"]
