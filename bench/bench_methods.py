"""Per-image test time and peak memory of the methods on the same inputs.

    python bench/bench_methods.py                       # tiny backbones, 224 px (seconds)
    python bench/bench_methods.py --size full --n-images 2   # ViT-L/14-336 (+ DINOv2-B for DCP-SFR), 518 px, random weights

Each method runs in its own process, so its peak resident memory (ru_maxrss) is its own; times are
wall-clock per image for fit (the k references) and predict, after one warm-up batch. Ratios are
against FDSL measured in the same run. On a CUDA device the peak is torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BACKBONES = {
    "tiny": {"fdsl": "tiny_clip", "knn": "tiny_clip", "dcpsfr": "clip=tiny_clip,dino=tiny_dinov2"},
    "full": {"fdsl": "clip_vit_l14_336", "knn": "clip_vit_l14_336", "dcpsfr": "clip=clip_vit_l14_336,dino=dinov2_vitb14"},
}


def measure(method_name: str, size: str, k: int, n_images: int, batch: int, device: str) -> dict:
    import torch

    from methods import create_method, resolve_method_config
    from utils.config import MethodConfig, resolve_device

    dev = resolve_device(device)
    torch.manual_seed(0)
    cfg = resolve_method_config(MethodConfig(name=method_name, backbone=BACKBONES[size][method_name],
                                             pretrained=",".join(f"{r}=none" for r in ("clip", "dino"))
                                             if method_name == "dcpsfr" else "none"))
    method = create_method(cfg, dev).eval()
    s = method.image_size
    refs, images = torch.rand(k, 3, s, s), torch.rand(n_images + batch, 3, s, s)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    state = method.fit(refs)
    sync()
    fit = time.perf_counter() - t0
    method.predict(images[:batch], state, (240, 240))  # warm-up
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    for i in range(batch, batch + n_images, batch):
        method.predict(images[i:i + batch], state, (240, 240))
    sync()
    per_image = (time.perf_counter() - t0) / n_images
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20
    return {"method": method_name, "image_size": s, "fit_s_per_ref": fit / k, "s_per_image": per_image,
            "peak_mib": peak, "trainable_params": sum(p.numel() for p in method.trainable_parameters())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(BACKBONES), default="tiny")
    p.add_argument("--k", type=int, default=1, help="reference images (default: %(default)s)")
    p.add_argument("--n-images", type=int, default=16, help="timed test images (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="images per predict call (default: %(default)s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", nargs="*", default=["fdsl", "knn", "dcpsfr"])
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one method, JSON out
    a = p.parse_args(argv)
    a.batch = min(a.batch, a.n_images)
    if a.one:
        print(json.dumps(measure(a.one, a.size, a.k, a.n_images, a.batch, a.device)))
        return 0
    rows = []
    for m in a.methods:
        out = subprocess.run([sys.executable, __file__, "--one", m, "--size", a.size, "--k", str(a.k), "--n-images",
                              str(a.n_images), "--batch", str(a.batch), "--device", a.device],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = next((r for r in rows if r["method"] == "fdsl"), rows[0])
    print(f"{a.size} backbones, {rows[0]['image_size']} px, k={a.k}, {a.n_images} images, batch {a.batch}, {a.device}")
    print(f"{'method':8} {'fit s/ref':>10} {'s/image':>9} {'x fdsl':>7} {'peak MiB':>9} {'x fdsl':>7} {'trainable':>10}")
    for r in rows:
        print(f"{r['method']:8} {r['fit_s_per_ref']:10.3f} {r['s_per_image']:9.4f} "
              f"{r['s_per_image'] / base['s_per_image']:7.2f} {r['peak_mib']:9.0f} {r['peak_mib'] / base['peak_mib']:7.2f} "
              f"{r['trainable_params']:10d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
