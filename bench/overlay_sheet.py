"""One small picture of predict.py runs: per run, a title line (method, references, threshold source),
then a row of overlays of normal photos above a row of defective ones, each titled with its score and
flag (the docs' picture of a calibrated run).

    python bench/overlay_sheet.py docs/img/calibrated_overlays.png OUT_DIR [OUT_DIR ...] --per-row 4

OUT_DIR is a predict.py output folder; a photo counts as normal when its path contains --normal. The
overlays are taken as predict.py wrote them (its colour scale), shrunk to --tile pixels high.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.visualize import save_png  # noqa: E402

GAP, HEADER, BACKGROUND = 4, 14, 40


def _tile(path: Path, height: int) -> Image.Image:
    with Image.open(path) as im:
        im = im.convert("RGB")
        return im.resize((max(1, round(im.width * height / im.height)), height), Image.BILINEAR)


def sheet(out_dir: Path, normal_marker: str, per_row: int, height: int) -> Image.Image:
    summary = json.loads((out_dir / "predictions.json").read_text(encoding="utf-8"))
    rows = summary["predictions"]
    normal = [r for r in rows if normal_marker in r["image"]]
    defective = [r for r in rows if normal_marker not in r["image"]]
    if not normal or not defective:
        raise ValueError(f"{out_dir}: need normal photos (path containing {normal_marker!r}) and defective ones")
    picked = [sorted(normal, key=lambda r: r["image"])[:per_row], sorted(defective, key=lambda r: r["image"])[:per_row]]
    tiles = [[(_tile(out_dir / r["overlay"], height), r) for r in row] for row in picked]
    width = max(sum(t.width for t, _ in row) + GAP * (len(row) - 1) for row in tiles)
    canvas = Image.new("RGB", (width, 3 * HEADER + 2 * height + GAP), (BACKGROUND,) * 3)
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    t = summary["threshold"]
    n_cal = len(t["calibration"]["photos"]) if t.get("calibration") else 0
    draw.text((2, 1), f"{summary['method']}, {len(summary['references'])} reference(s), thresholds: {t['source']}"
              + (f" ({n_cal} photos)" if t["source"] == "calibration" else "")
              + (f", anomalous: score >= {t['image']:.3f}" if t.get("image") is not None else ""),
              fill=(255, 255, 160), font=font)
    y = HEADER
    for row in tiles:
        x = 0
        for tile, r in row:
            flag = "FLAGGED" if r.get("anomalous") else "ok" if "anomalous" in r else ""
            kind = "good" if normal_marker in r["image"] else Path(r["image"]).parent.name[:6]
            label = f"{kind} {r['score']:.3f} {flag}"
            draw.text((x + 2, y + 1), label, fill=(235, 235, 235), font=font)
            canvas.paste(tile, (x, y + HEADER))
            x += tile.width + GAP
        y += HEADER + height + GAP
    return canvas


def stack(parts: list[Image.Image]) -> np.ndarray:
    out = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts) + 2 * GAP * (len(parts) - 1)),
                    (BACKGROUND,) * 3)
    y = 0
    for part in parts:
        out.paste(part, (0, y))
        y += part.height + 2 * GAP
    return np.asarray(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("png", type=Path, help="the picture to write")
    p.add_argument("out_dirs", type=Path, nargs="+", help="predict.py output folders, one section each")
    p.add_argument("--normal", default="/good/", help="a normal photo's path contains this (default: %(default)s)")
    p.add_argument("--per-row", type=int, default=4, help="photos per row (default: %(default)s)")
    p.add_argument("--tile", type=int, default=160, help="tile height in pixels (default: %(default)s)")
    a = p.parse_args(argv)
    if a.per_row < 1 or a.tile < 16:
        raise SystemExit("overlay_sheet.py: error: --per-row must be >= 1 and --tile >= 16")
    save_png(a.png, stack([sheet(d, a.normal, a.per_row, a.tile) for d in a.out_dirs]))
    print(f"wrote {a.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
