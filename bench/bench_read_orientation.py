"""What reading the EXIF orientation costs on every image read (data/images.py), as a ratio to the same
reads with the orientation lookup switched off, in one process.

Workload: 40 photo-sized files per format (1024x768 RGB): PNG without EXIF (the chunk walk that looks for
EXIF behind the pixels), PNG with an eXIf chunk, JPEG with Orientation 6 (the lookup plus the turn), and
header_size() on the plain PNGs (no pixel decode, so the walk is the largest share there).

    python bench/bench_read_orientation.py [--n 40] [--repeat 3]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data.images as images  # noqa: E402


def make_files(folder: Path, n: int) -> dict[str, list[Path]]:
    rng = np.random.default_rng(0)
    out: dict[str, list[Path]] = {"png": [], "png_exif": [], "jpeg_o6": []}
    exif = Image.Exif()
    exif[274] = 6
    for i in range(n):
        # smooth content compresses like a photo, noise would make PNG decoding dominate even more
        base = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        im = Image.fromarray(base).resize((1024, 768), Image.BICUBIC)
        out["png"].append(folder / f"{i}.png")
        im.save(out["png"][-1])
        out["png_exif"].append(folder / f"{i}_exif.png")
        im.save(out["png_exif"][-1], exif=exif)
        out["jpeg_o6"].append(folder / f"{i}.jpg")
        im.save(out["jpeg_o6"][-1], quality=90, exif=exif)
    return out


def timed(fn, paths, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for p in paths:
            fn(p)
        best = min(best, time.perf_counter() - t0)
    return best / len(paths)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = make_files(Path(tmp), a.n)
        real = images.orientation
        cases = [("read_image png (no EXIF)", lambda p: images.read_image(p, 518), files["png"]),
                 ("read_image png (eXIf)", lambda p: images.read_image(p, 518), files["png_exif"]),
                 ("read_image jpeg (turned)", lambda p: images.read_image(p, 518), files["jpeg_o6"]),
                 ("header_size png (no EXIF)", images.header_size, files["png"])]
        print(f"{'workload':28s} {'off ms':>8s} {'on ms':>8s} {'on/off':>7s}")
        for name, fn, paths in cases:
            images.orientation = lambda im, path: (None, None, im.size)  # the reads as before the change
            off = timed(fn, paths, a.repeat)
            images.orientation = real
            on = timed(fn, paths, a.repeat)
            print(f"{name:28s} {off * 1e3:8.2f} {on * 1e3:8.2f} {on / off:7.2f}")
        print("turned JPEG: 'off' reads the pixels as stored (wrong), 'on' turns them: the ratio is the turn's cost")


if __name__ == "__main__":
    main()
