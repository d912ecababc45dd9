"""Thresholds without labels: the normal range of a method's maps and scores, measured on normal photos.

A method's map values and image scores are on its own scale (knn: 1 - cosine, about 0.2 to 0.45 on
real photos; fdsl: probabilities), so a fixed threshold or a fixed [0, 1] colour scale means
something different for every method, backbone and product. Scoring a few normal photos against the
references measures that scale where it matters: what "normal" looks like.

The rule (`estimate`):

- image threshold = the `image_percentile`-th percentile of the normal photos' image scores, taken
  as one of the observed scores (numpy's "higher" method). The default, 100, is their maximum: if
  a new normal photo is exchangeable with the N calibration photos, the chance that it scores above
  all N is 1 / (N + 1), so the expected false-positive rate is at most 1 / (N + 1) (5 % for 19
  photos) with no assumption on the score's distribution. A lower percentile trades false alarms
  for recall.
- pixel threshold = the `pixel_percentile`-th percentile of all normal pixel values pooled (every
  photo's map at one size, so each photo weighs the same). Default 99.9: a pixel is marked when it
  lies beyond 99.9 % of what normal surfaces produce, so about 1 pixel in 1000 of a normal photo
  is marked, and a defect's region, which lies beyond the whole normal range, is.
- colour floor = the median normal pixel value. The overlay's colour scale runs from the floor
  (bottom colour) through the pixel threshold (middle colour) to threshold + (threshold - floor)
  (top colour): most of a normal photo is cold, and only values beyond normal turn warm.

Where no separate normal photos exist, `leave_one_out` scores each of k >= 2 references against the
other k - 1: never against itself (its score would be about 0 by construction). Those scores come
from k - 1 references, one fewer than the run uses, so they are somewhat higher than a new normal
photo's would be, and only k of them: a weaker estimate, said so where it is used.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

DEFAULT_PIXEL_PERCENTILE = 99.9
DEFAULT_IMAGE_PERCENTILE = 100.0
FLOOR_PERCENTILE = 50.0  # the colour scale's bottom: the median normal pixel
CALIBRATION = "calibration"
LEAVE_ONE_OUT = "references, leave-one-out"


def check_percentile(value, what: str) -> float:
    """A percentile in (0, 100], or ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 < value <= 100.0:
        raise ValueError(f"{what} must be a number in (0, 100], got {value!r}")
    return float(value)


@dataclass
class Calibration:
    """The normal range measured on `photos`, and the thresholds it gives."""
    pixel: float  # masks: map >= pixel
    image: float  # anomalous: score >= image
    floor: float  # median normal pixel: the colour scale's bottom
    source: str  # CALIBRATION or LEAVE_ONE_OUT
    photos: list[str]
    pixel_percentile: float
    image_percentile: float
    normal_scores: list[float] = field(default_factory=list)

    @property
    def rule(self) -> str:
        image = "the maximum" if self.image_percentile == 100.0 else f"the {self.image_percentile:g}th percentile"
        return (f"image threshold = {image} of the image scores of {len(self.photos)} normal photo(s) ({self.source}); "
                f"pixel threshold = the {self.pixel_percentile:g}th percentile of their pooled map values; "
                f"anomalous: score >= {self.image:.6g}")

    def colour_scale(self, colormap: str):
        """Floor -> bottom colour, pixel threshold -> middle, threshold + (threshold - floor) -> top."""
        from utils.visualize import ColourScale

        return ColourScale.centred(self.floor, self.pixel, colormap)

    def as_dict(self) -> dict:
        return {**asdict(self), "n_photos": len(self.photos), "rule": self.rule}


def _pooled(maps) -> np.ndarray:
    if isinstance(maps, torch.Tensor):
        maps = maps.detach().float().cpu().numpy()
    if isinstance(maps, np.ndarray):
        return maps.reshape(-1)
    return np.concatenate([np.asarray(m, dtype=np.float32).reshape(-1) for m in maps]) if len(maps) else np.empty(0)


def estimate(maps, scores, photos: Sequence[str], *, source: str = CALIBRATION,
             pixel_percentile: float = DEFAULT_PIXEL_PERCENTILE,
             image_percentile: float = DEFAULT_IMAGE_PERCENTILE) -> Calibration:
    """Thresholds from the maps (N, H, W) (or N arrays of any shape) and image scores (N,) of N normal
    photos, by the rule of this module's docstring. Every map and score must be finite."""
    pixel_percentile = check_percentile(pixel_percentile, "pixel percentile (--pixel-percentile)")
    image_percentile = check_percentile(image_percentile, "image percentile (--image-percentile)")
    scores = np.asarray(scores.detach().float().cpu() if isinstance(scores, torch.Tensor) else scores,
                        dtype=np.float64).reshape(-1)
    values = _pooled(maps)
    if scores.size == 0 or values.size == 0:
        raise ValueError("calibration needs at least one normal photo with a map and a score")
    if scores.size != len(photos):
        raise ValueError(f"calibration: {scores.size} scores for {len(photos)} photos")
    bad = [photos[i] for i in np.flatnonzero(~np.isfinite(scores))]
    if bad or not np.isfinite(values).all():
        raise ValueError(f"calibration: non-finite map value or score (first photo: {(bad or list(photos))[0]}); "
                         f"the method produced NaN or inf on a normal photo")
    floor, pixel = np.percentile(values, [FLOOR_PERCENTILE, pixel_percentile])
    image = np.percentile(scores, image_percentile, method="higher")
    return Calibration(pixel=float(pixel), image=float(image), floor=float(floor), source=source,
                       photos=[str(p) for p in photos], pixel_percentile=pixel_percentile,
                       image_percentile=image_percentile, normal_scores=[float(s) for s in scores])


# --------------------------------------------------------------------------- #
# scoring normal photos with a method
# --------------------------------------------------------------------------- #
@torch.no_grad()
def score_images(method: Any, state: Any, images: torch.Tensor, out_size: tuple[int, int],
                 batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Maps (N, H, W) and per-photo scores (N,) of `images` against a fitted reference state, as float32
    numpy: the method's own Method.predict, in batches."""
    maps, scores = [], []
    for s in range(0, images.shape[0], batch_size):
        m, sc = method.predict(images[s:s + batch_size].to(method.device), state, out_size)
        maps.append(m.float().cpu())
        scores.append(sc.float().cpu())
    return torch.cat(maps).numpy(), torch.cat(scores).numpy()


@torch.no_grad()
def leave_one_out(method: Any, images: torch.Tensor, sources: Sequence[str], out_size: tuple[int, int],
                  batch_size: int = 8, category: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Maps and scores of each of k >= 2 references scored against a state fitted on the other k - 1."""
    k = images.shape[0]
    if k < 2:
        raise ValueError(f"leave-one-out needs at least 2 references, got {k}")
    if len(sources) != k:
        raise ValueError(f"leave-one-out: {len(sources)} sources for {k} reference images")
    maps, scores = [], []
    for i in range(k):
        others = [j for j in range(k) if j != i]
        state = method.fit(images[others], [sources[j] for j in others], batch_size, category=category)
        m, s = score_images(method, state, images[i:i + 1], out_size, batch_size)
        maps.append(m)
        scores.append(s)
    return np.concatenate(maps), np.concatenate(scores)


def rates(labels, decisions) -> tuple[float, float]:
    """(false-positive rate over the normal items, recall over the anomalous ones) of boolean
    decisions; NaN where a class is absent."""
    y = np.asarray(labels).reshape(-1).astype(bool)
    d = np.asarray(decisions).reshape(-1).astype(bool)
    if y.shape != d.shape:
        raise ValueError(f"labels and decisions differ in size: {y.shape} vs {d.shape}")
    fpr = float(d[~y].mean()) if (~y).any() else float("nan")
    recall = float(d[y].mean()) if y.any() else float("nan")
    return fpr, recall


__all__ = ["CALIBRATION", "Calibration", "DEFAULT_IMAGE_PERCENTILE", "DEFAULT_PIXEL_PERCENTILE", "LEAVE_ONE_OUT",
           "check_percentile", "estimate", "leave_one_out", "rates", "score_images"]
