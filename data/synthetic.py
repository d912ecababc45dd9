"""Synthetic anomaly-detection datasets in the MVTec AD layout, for tests and demos.

Each category is a texture (tiles, fabric, wood) or a centred object (candle, pcb, bolt)
whose normal images vary by random phase, pose and colour jitter. Defective test images
get one of: scratch, blob, patch, colour, texture, with a 0/255 mask of exactly the pixels
that changed. Everything is drawn from numpy Generators keyed by (seed, category, split,
index), so output is deterministic and one category does not depend on the others.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import zlib
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from scipy.ndimage import binary_fill_holes

if __package__ in (None, ""):  # run as `python data/synthetic.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.meta import META_NAME, summarise, write_meta  # noqa: E402
from data.mvtec import build_meta  # noqa: E402
from utils.io import atomic_write_json, read_json  # noqa: E402

GENERATOR_VERSION = 1  # bump when rendering changes, so cached demo datasets are rebuilt
DEFECTS = ("scratch", "blob", "patch", "colour", "texture")
TEXTURE_STYLES = ("checker", "weave", "grain")
OBJECT_STYLES = ("disk", "board", "bolt")
# Each style gets a subset of defects, so categories differ in what can go wrong.
STYLE_DEFECTS = {
    "checker": ("scratch", "patch", "colour"),
    "weave": ("blob", "texture", "colour"),
    "grain": ("scratch", "blob", "texture"),
    "disk": ("blob", "colour", "patch"),
    "board": ("scratch", "patch", "colour"),
    "bolt": ("scratch", "texture", "blob"),
}
CATEGORY_STYLES = {"tiles": "checker", "fabric": "weave", "wood_board": "grain",
                   "candle": "disk", "pcb": "board", "bolt": "bolt"}
DEMO_DATASETS = {"synth_mvtec": ("tiles", "fabric", "bolt"), "synth_visa": ("pcb", "candle", "wood_board")}
CHANGE_THRESHOLD = 16  # uint8 levels: smaller differences are not part of a defect
AREA_RANGE = (0.01, 0.10)  # target defect area, as a fraction of the image


def style_for(category: str) -> str:
    """Known names and style names map directly; any other name gets a stable style by hash."""
    if category in CATEGORY_STYLES:
        return CATEGORY_STYLES[category]
    styles = TEXTURE_STYLES + OBJECT_STYLES
    return category if category in styles else styles[zlib.crc32(category.encode()) % len(styles)]


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    # Pixel centres in [-0.5, 0.5): patterns are defined per image, not per pixel.
    t = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    return np.meshgrid(t, t)


def _rotate(x, y, angle, dx=0.0, dy=0.0, scale=1.0):
    c, s = np.cos(angle), np.sin(angle)
    return ((x - dx) * c + (y - dy) * s) / scale, (-(x - dx) * s + (y - dy) * c) / scale


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    n = cv2.resize(rng.standard_normal((cells, cells)).astype(np.float32), (size, size),
                   interpolation=cv2.INTER_CUBIC)
    return (n - n.mean()) / (n.std() + 1e-6)


def _jitter(rng, colour, amount=0.04):
    return np.clip(np.asarray(colour, np.float32) + rng.uniform(-amount, amount, 3), 0, 1).astype(np.float32)


def _mix(a, b, t):
    """Per-pixel blend of two colours (or images) by weight map t."""
    t = t[..., None] if np.ndim(t) == 2 else t
    return a * (1 - t) + b * t


# ---- textures: a params dict fully describes the pattern, so a defect can re-render it altered


def texture_params(style: str, rng: np.random.Generator) -> dict:
    base = {"checker": (6.0, (0.85, 0.82, 0.74)), "weave": (14.0, (0.25, 0.35, 0.6)),
            "grain": (7.0, (0.72, 0.52, 0.32))}[style]
    return {"style": style, "freq": base[0] * rng.uniform(0.97, 1.03), "angle": rng.uniform(-0.04, 0.04),
            "phase": rng.uniform(0, 1, 2), "colour": _jitter(rng, base[1]), "seed": int(rng.integers(2**31))}


def render_texture(p: dict, size: int) -> np.ndarray:
    rng = np.random.default_rng(p["seed"])
    x, y = _grid(size)
    u, v = _rotate(x, y, p["angle"])
    u, v = u * p["freq"] + p["phase"][0], v * p["freq"] + p["phase"][1]
    col = p["colour"]
    if p["style"] == "checker":  # two-tone tiles with dark grout and slight per-tile shade
        iu, iv = np.floor(u), np.floor(v)
        fu, fv = u - iu, v - iv
        tone = np.where(((iu + iv) % 2 == 0), 1.0, 0.8) + 0.04 * np.sin(iu * 12.99 + iv * 78.23)
        img = col * tone[..., None]
        grout = np.minimum(np.minimum(fu, 1 - fu), np.minimum(fv, 1 - fv)) < 0.05
        img[grout] = col * 0.35
    elif p["style"] == "weave":  # basket weave: threads alternate direction cell by cell
        iu, iv = np.floor(u), np.floor(v)
        along_u = (iu + iv) % 2 == 0
        shade = np.where(along_u, np.sin(np.pi * (v - iv)), np.sin(np.pi * (u - iu)))
        img = col * (0.45 + 0.6 * shade)[..., None]
    else:  # grain: wavy growth rings plus streaks along the grain
        warp = _smooth_noise(rng, size, 4)
        rings = 0.5 + 0.5 * np.sin(2 * np.pi * (v + 0.35 * warp))
        streak = cv2.blur(rng.standard_normal((size, size)).astype(np.float32), (max(3, size // 8), 1))
        img = _mix(col, col * 0.55, rings ** 2 + 0.15 * streak)
    img = img + rng.normal(0, 0.015, img.shape[:2])[..., None]
    return np.clip(img, 0, 1).astype(np.float32)


# ---- objects: signed distances in object coordinates, so pose jitter is a coordinate change


def _sd_circle(u, v, r):
    return np.sqrt(u * u + v * v) - r


def _sd_box(u, v, hx, hy, r=0.0):
    qx, qy = np.abs(u) - hx + r, np.abs(v) - hy + r
    return np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2) + np.minimum(np.maximum(qx, qy), 0) - r


def render_object(style: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(image, foreground mask) for a centred object with small random pose and colour jitter."""
    x, y = _grid(size)
    dx, dy = rng.uniform(-0.03, 0.03, 2)
    scale = rng.uniform(0.96, 1.04)
    u, v = _rotate(x, y, rng.uniform(-0.1, 0.1), dx, dy, scale)
    cover = lambda sd: np.clip(0.5 - sd * size / scale, 0, 1)  # noqa: E731 - 1-pixel anti-aliasing
    if style == "disk":  # candle seen from above: wax disk, rim, melt pool, wick
        r = np.sqrt(u * u + v * v)
        bg, wax = _jitter(rng, (0.13, 0.13, 0.16), 0.02), _jitter(rng, (0.93, 0.88, 0.76))
        body = wax * (1 - 0.2 * (r / 0.34) ** 2)[..., None]
        body = _mix(body, wax * 0.8, cover(np.abs(r - 0.3) - 0.01))
        body = _mix(body, _jitter(rng, (0.98, 0.92, 0.6)), cover(r - 0.12))
        body = _mix(body, np.float32([0.12, 0.1, 0.08]), cover(r - 0.022))
        alpha = cover(_sd_circle(u, v, 0.34))
    elif style == "board":  # pcb: green board, gold traces, a chip, mounting holes
        bg, green = _jitter(rng, (0.82, 0.82, 0.8), 0.02), _jitter(rng, (0.12, 0.42, 0.2))
        body = np.broadcast_to(green, x.shape + (3,)).copy()
        for v0 in (-0.17, -0.09, -0.01, 0.07, 0.15):
            body = _mix(body, np.float32([0.82, 0.66, 0.3]), cover(_sd_box(u + 0.17, v - v0, 0.15, 0.012)))
        body = _mix(body, np.float32([0.08, 0.08, 0.09]), cover(_sd_box(u - 0.18, v, 0.1, 0.1, 0.01)))
        holes = np.minimum.reduce([_sd_circle(u - sx * 0.34, v - sy * 0.22, 0.025)
                                   for sx in (-1, 1) for sy in (-1, 1)])
        alpha = cover(np.maximum(_sd_box(u, v, 0.4, 0.28, 0.04), -holes))
    else:  # bolt: hexagon-ish head and a threaded shaft, metallic shading across the axis
        bg, steel = _jitter(rng, (0.88, 0.88, 0.86), 0.02), _jitter(rng, (0.6, 0.6, 0.62), 0.03)
        thread = np.abs(np.sin(np.pi * u / 0.035))
        head = _sd_box(u + 0.32, v, 0.07, 0.19, 0.02)
        shaft = _sd_box(u - 0.07, v, 0.33, 0.085 + 0.014 * thread, 0.02)
        across = np.clip(np.abs(v) / np.where(head < shaft, 0.19, 0.1), 0, 1)
        shade = 0.75 + 0.4 * np.cos(across * np.pi / 2) + np.where(head < shaft, 0, 0.1 * (thread - 0.5))
        body = steel * shade[..., None]
        alpha = cover(np.minimum(head, shaft))
    bg_img = bg + rng.normal(0, 0.01, x.shape)[..., None]
    img = _mix(bg_img, body, alpha)
    return np.clip(img, 0, 1).astype(np.float32), alpha > 0.5


def render(style: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict | None]:
    """(image in [0, 1], foreground mask, texture params or None for objects)."""
    if style in TEXTURE_STYLES:
        p = texture_params(style, rng)
        return render_texture(p, size), np.ones((size, size), bool), p
    img, fg = render_object(style, size, rng)
    return img, fg, None


# ---- defects: draw the region first, change pixels only there, then keep what really changed


def _target_area(rng: np.random.Generator, size: int) -> float:
    lo, hi = np.log(AREA_RANGE)
    return float(np.exp(rng.uniform(lo, hi))) * size * size


def _centre(rng: np.random.Generator, fg: np.ndarray) -> tuple[float, float]:
    """A random foreground pixel, kept off the border so defects are rarely cut off."""
    size, margin = fg.shape[0], fg.shape[0] // 10
    inner = cv2.erode(fg.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    inner[:margin], inner[-margin:], inner[:, :margin], inner[:, -margin:] = False, False, False, False
    ys, xs = np.nonzero(inner if inner.any() else fg)
    k = rng.integers(len(xs))
    return float(xs[k]), float(ys[k])


def _region(kind: str, rng: np.random.Generator, size: int, cx: float, cy: float, area: float) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    if kind == "scratch":  # a thin polyline of a few bending segments
        t = max(2, int(round(size * rng.uniform(0.012, 0.025))))
        length = float(np.clip(area / t, 0.25 * size, 0.9 * size))
        k = int(rng.integers(2, 5))
        heading = np.cumsum(rng.uniform(-0.7, 0.7, k)) + rng.uniform(0, 2 * np.pi)
        pts = np.cumsum(np.stack([np.cos(heading), np.sin(heading)], 1) * length / k, 0)
        pts = np.vstack([[0, 0], pts])
        pts += np.float64([cx, cy]) - pts.mean(0)
        cv2.polylines(m, [np.round(pts).astype(np.int32)], False, 1, thickness=t)
    elif kind in ("blob", "texture"):  # a smooth, irregular star-shaped outline
        th = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        r = np.ones_like(th)
        for k in (2, 3, 4, 5):
            r += rng.uniform(0, 0.3) / (k - 1) * np.cos(k * th + rng.uniform(0, 2 * np.pi))
        r *= np.sqrt(area / np.pi / np.mean(r ** 2))  # keep the enclosed area near the target
        pts = np.stack([cx + r * np.cos(th), cy + r * np.sin(th)], 1)
        cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1)
    elif kind == "colour":
        ratio = rng.uniform(1, 2.5)
        b = np.sqrt(area / np.pi / ratio)
        axes = (int(round(b * ratio)), max(2, int(round(b))))
        cv2.ellipse(m, (int(round(cx)), int(round(cy))), axes, rng.uniform(0, 180), 0, 360, 1, -1)
    else:  # patch: an axis-aligned square
        side = max(4, int(round(np.sqrt(area))))
        x0 = int(np.clip(round(cx - side / 2), 0, size - side))
        y0 = int(np.clip(round(cy - side / 2), 0, size - side))
        m[y0:y0 + side, x0:x0 + side] = 1
    return m.astype(bool)


def _altered(kind: str, img: np.ndarray, region: np.ndarray, style: str, params: dict | None,
             rng: np.random.Generator) -> np.ndarray:
    """A full-size replacement image; only its pixels inside the region are used."""
    size = img.shape[0]
    bright = img[region].mean() > 0.45
    if kind == "scratch":  # contrasting colour: dark on bright surfaces, light on dark ones
        colour = rng.uniform(0.0, 0.2, 3) if bright else rng.uniform(0.8, 1.0, 3)
        return np.broadcast_to(colour.astype(np.float32), img.shape)
    if kind == "blob":  # a stain whose opacity varies smoothly inside
        colour = _jitter(rng, (0.12, 0.08, 0.05) if bright else (0.95, 0.93, 0.85))
        opacity = rng.uniform(0.55, 0.8) * (0.85 + 0.15 * np.tanh(_smooth_noise(rng, size, 6)))
        return _mix(img, colour, opacity)
    if kind == "patch":  # foreign material: a piece of a different texture
        other = [s for s in TEXTURE_STYLES if s != style]
        tex = render_texture(texture_params(other[rng.integers(len(other))], rng), size)
        return np.roll(tex, tuple(rng.integers(0, size, 2)), axis=(0, 1))
    if kind == "colour":  # hue rotation plus a brightness offset
        hue = rng.uniform(0, 2 * np.pi)
        shift = np.cos(hue + np.float32([0, 2, 4]) * np.pi / 3) * rng.uniform(0.25, 0.4) + rng.uniform(-0.12, 0.12)
        return np.clip(img + shift.astype(np.float32), 0, 1)
    if params is not None:  # texture on a texture: same pattern, wrong frequency and orientation
        sign = 1 if rng.random() < 0.5 else -1
        return render_texture(dict(params, freq=params["freq"] * rng.uniform(1.7, 2.4),
                                   angle=params["angle"] + sign * rng.uniform(0.4, 1.1),
                                   seed=int(rng.integers(2**31))), size)
    # texture on an object: rough, pitted surface; steps flip sign where they would clip
    n = _smooth_noise(rng, size, max(8, size // 5))
    step = (np.sign(n) * (0.12 + 0.08 * np.minimum(np.abs(n), 1)))[..., None].astype(np.float32)
    return np.where((img + step > 1) | (img + step < 0), img - step, img + step)


def _ensure_change(src: np.ndarray, alt: np.ndarray, step: float = 0.1) -> np.ndarray:
    """Push pixels the defect happened to leave nearly unchanged (a dark scratch on dark grout, a
    re-rendered texture crossing the old one) by `step`, so the whole region is a visible change."""
    weak = np.abs(alt - src).max(-1) < step
    direction = np.where(src.mean(-1) < 0.5, step, -step)[..., None]
    return np.where(weak[..., None], np.clip(src + direction, 0, 1), alt).astype(np.float32)


def _to_u8(img: np.ndarray) -> np.ndarray:
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def apply_defect(clean: np.ndarray, fg: np.ndarray, kind: str, style: str, params: dict | None,
                 rng: np.random.Generator, tries: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """(defective uint8 image, bool mask); pixels outside the mask are byte-identical to `clean`."""
    size, src = clean.shape[0], clean.astype(np.float32) / 255
    best = None
    for _ in range(tries):
        region = _region(kind, rng, size, *_centre(rng, fg), _target_area(rng, size)) & fg
        if not region.any():
            continue
        alt = _ensure_change(src, _altered(kind, src, region, style, params, rng))
        out = _to_u8(np.where(region[..., None], alt, src))
        changed = np.abs(out.astype(np.int16) - clean).max(-1) > CHANGE_THRESHOLD
        # Unchanged specks enclosed by the defect belong to it; holes outside the region (pcb) do not.
        mask = binary_fill_holes(region & changed) & region
        out[~mask] = clean[~mask]
        frac = mask.mean()
        if mask.sum() >= 0.6 * region.sum() and 0.005 <= frac <= 0.13:
            return out, mask
        if mask.any() and (best is None or mask.sum() > best[1].sum()):
            best = (out, mask)
    if best is None:
        raise RuntimeError(f"could not place a visible {kind!r} defect on a {style!r} image")
    return best


# ---- datasets

PARAMS_NAME = "params.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _params(categories, seed, size, n_train, n_test_good, n_test_bad, defect_types) -> dict:
    """Validated generation parameters, in the form recorded in params.json."""
    categories = list(categories)
    if not categories or len(set(categories)) != len(categories):
        raise ValueError(f"categories must be a non-empty list of distinct names, got {categories}")
    bad = [c for c in categories if not _NAME_RE.match(c)]
    if bad:
        raise ValueError(f"category {bad[0]!r} is not a plain folder name (letters, digits, _ . -)")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    if n_train < 1 or n_test_good < 0 or n_test_bad < 0:
        raise ValueError("need n_train >= 1, n_test_good >= 0 and n_test_bad >= 0")
    if defect_types is not None:
        defect_types = list(defect_types)
        unknown = [d for d in defect_types if d not in DEFECTS]
        if not defect_types or unknown:
            raise ValueError(f"defect types must be among {', '.join(DEFECTS)}, got {defect_types}")
    return {"version": GENERATOR_VERSION, "categories": categories, "seed": int(seed), "size": int(size),
            "n_train": int(n_train), "n_test_good": int(n_test_good), "n_test_bad": int(n_test_bad),
            "defect_types": defect_types}


def _prepare_out(out: Path, categories: list[str]) -> None:
    """Clear what an earlier run of this generator wrote; never touch anything else."""
    previous = out / PARAMS_NAME
    if previous.is_file():
        stale = set(read_json(previous, "synthetic dataset params").get("categories", [])) | set(categories)
        previous.unlink()  # written again last, so a half-finished run is never mistaken for done
    else:
        clash = [p for p in [out / c for c in categories] + [out / META_NAME] if p.exists()]
        if clash:
            raise FileExistsError(f"refusing to overwrite {clash[0]}: {out} has no {PARAMS_NAME}, "
                                  f"so it was not written by data/synthetic.py")
        stale = set()
    for name in sorted(stale):
        if _NAME_RE.match(name) and (out / name).is_dir():
            shutil.rmtree(out / name)
    (out / META_NAME).unlink(missing_ok=True)


def _write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), arr[..., ::-1] if arr.ndim == 3 else arr):  # OpenCV expects BGR
        raise OSError(f"could not write {path}")


def _write_category(out: Path, cls: str, p: dict) -> None:
    style, key, size = style_for(cls), zlib.crc32(cls.encode()), p["size"]
    defects = p["defect_types"] or STYLE_DEFECTS[style]
    root = out / cls
    (root / "test" / "good").mkdir(parents=True, exist_ok=True)  # the layout needs test/ even when empty
    for split, count, code in (("train", p["n_train"], 0), ("test", p["n_test_good"], 1)):
        for i in range(count):
            _write_png(root / split / "good" / f"{i:03d}.png", _to_u8(render(style, size, _rng(p["seed"], key, code, i))[0]))
    per_kind = dict.fromkeys(defects, 0)
    for i in range(p["n_test_bad"]):
        kind = defects[i % len(defects)]  # round robin, so every defect type appears
        rng = _rng(p["seed"], key, 2, i)
        img, fg, params = render(style, size, rng)
        bad, mask = apply_defect(_to_u8(img), fg, kind, style, params, rng)
        j, per_kind[kind] = per_kind[kind], per_kind[kind] + 1
        _write_png(root / "test" / kind / f"{j:03d}.png", bad)
        _write_png(root / "ground_truth" / kind / f"{j:03d}_mask.png", mask.astype(np.uint8) * 255)


def generate(out, categories=DEMO_DATASETS["synth_mvtec"], seed: int = 0, size: int = 128, n_train: int = 8,
             n_test_good: int = 6, n_test_bad: int = 10, defect_types=None) -> Path:
    """Write an MVTec-layout dataset plus meta.json and params.json under `out`; returns `out`."""
    out = Path(out)
    p = _params(categories, seed, size, n_train, n_test_good, n_test_bad, defect_types)
    out.mkdir(parents=True, exist_ok=True)
    _prepare_out(out, p["categories"])
    for cls in p["categories"]:
        _write_category(out, cls, p)
    write_meta(out, build_meta(out, p["categories"]))
    atomic_write_json(out / PARAMS_NAME, p)
    return out


def _up_to_date(root: Path, wanted: dict) -> bool:
    try:
        return (root / META_NAME).is_file() and read_json(root / PARAMS_NAME) == wanted
    except (FileNotFoundError, ValueError):
        return False


def make_demo_pair(out_root, seed: int = 0, size: int = 128, n_train: int = 8, n_test_good: int = 6,
                   n_test_bad: int = 10) -> tuple[Path, Path]:
    """Two datasets standing in for MVTec AD and VisA (different categories); reused when up to date."""
    roots = []
    for name, categories in DEMO_DATASETS.items():
        root = Path(out_root) / name
        if not _up_to_date(root, _params(categories, seed, size, n_train, n_test_good, n_test_bad, None)):
            generate(root, categories, seed, size, n_train, n_test_good, n_test_bad)
        roots.append(root)
    return roots[0], roots[1]


def main(argv: list[str] | None = None) -> int:
    known = ", ".join(f"{c} ({s})" for c, s in CATEGORY_STYLES.items())
    parser = argparse.ArgumentParser(
        description="Generate a synthetic anomaly-detection dataset in the MVTec AD layout, with meta.json.",
        epilog=f"Known categories: {known}. Style names ({', '.join(TEXTURE_STYLES + OBJECT_STYLES)}) work as "
               f"categories too; any other name gets a style chosen by hashing the name. "
               f"--demo-pair writes {' and '.join(DEMO_DATASETS)} under --out instead.")
    parser.add_argument("--out", required=True, type=Path, help="output dataset folder")
    parser.add_argument("--categories", nargs="+", default=list(DEMO_DATASETS["synth_mvtec"]))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--n-train", type=int, default=8, help="normal training images per category")
    parser.add_argument("--n-test-good", type=int, default=6, help="normal test images per category")
    parser.add_argument("--n-test-bad", type=int, default=10, help="defective test images per category")
    parser.add_argument("--defect-types", nargs="+", choices=DEFECTS,
                        help="defects for every category (default: a per-category subset)")
    parser.add_argument("--demo-pair", action="store_true", help="write the two demo datasets")
    a = parser.parse_args(argv)
    counts = (a.seed, a.size, a.n_train, a.n_test_good, a.n_test_bad)
    try:
        roots = (make_demo_pair(a.out, *counts) if a.demo_pair
                 else [generate(a.out, a.categories, *counts, defect_types=a.defect_types)])
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for root in roots:
        print(f"{root}:\n{summarise(read_json(root / META_NAME))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
