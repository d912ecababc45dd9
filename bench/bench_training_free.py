"""Time per test image of anomalydino against knn on the same backbone and the same inputs, in one
process (the issue's target: within 1.5x of knn).

    python bench/bench_training_free.py                                   # efficientnet_lite0 and DINOv2-S
    python bench/bench_training_free.py --backbones tiny_dinov2 --k 1 --n-images 8

For each backbone and k, knn, anomalydino on a category it does not mask, anomalydino with its
foreground mask on (the per-image PCA) and anomalydino matching each image against its most similar
rotated reference only (--image-index all) score the same random queries against the same random
references; weights are random (time does not depend on their values). Only `predict` is timed
(the reference bank is built once per row, as once per category in test.py), each repeat running
the rows in turn, the order rotated between repeats; the median over repeats is reported with its
ratio to knn's. The machine's load moves all rows alike; ratios are what to read.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from methods import create_method, resolve_method_config  # noqa: E402
from methods.base import InferenceOptions  # noqa: E402
from utils.config import MethodConfig, resolve_device  # noqa: E402

# (label, method, parameters, image index): "all" matches a test image against its most similar
# reference only (for anomalydino: the most similar rotated copy), test.py --image-index all
ROWS = (("knn", "knn", {}, "off"), ("anomalydino", "anomalydino", {"masking": "off"}, "off"),
        ("anomalydino masked", "anomalydino", {"masking": "on"}, "off"),
        ("anomalydino index", "anomalydino", {"masking": "off"}, "all"))


def measure(backbone: str, k: int, n_images: int, batch: int, repeats: int, device: str) -> list[dict]:
    dev = resolve_device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    methods = []
    for label, name, params, index in ROWS:
        torch.manual_seed(0)
        cfg = resolve_method_config(MethodConfig(name=name, backbone=backbone, pretrained="none", params=params))
        method = create_method(cfg, dev).eval()
        method.configure(InferenceOptions(image_index=index))
        methods.append((label, method))
    s = methods[0][1].image_size
    g = torch.Generator().manual_seed(0)
    refs, queries = torch.rand(k, 3, s, s, generator=g), torch.rand(n_images, 3, s, s, generator=g)
    states = [m.fit(refs.to(dev)) for _, m in methods]
    times = {label: [] for label, _ in methods}
    for label, m in methods:  # warm-up
        m.predict(queries[:batch].to(dev), states[[lb for lb, _ in methods].index(label)], (240, 240))
    for r in range(repeats):
        order = list(range(len(methods)))
        order = order[r % len(order):] + order[:r % len(order)]
        for i in order:
            label, m = methods[i]
            sync()
            t0 = time.perf_counter()
            for start in range(0, n_images, batch):
                m.predict(queries[start:start + batch].to(dev), states[i], (240, 240))
            sync()
            times[label].append((time.perf_counter() - t0) / n_images)
    base = statistics.median(times["knn"])
    return [{"backbone": backbone, "px": s, "k": k, "method": label, "s_per_image": statistics.median(times[label]),
             "x_knn": statistics.median(times[label]) / base, "bank_mib": states[i].bank.nbytes() / 2 ** 20}
            for i, (label, _) in enumerate(methods)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "dinov2_vits14_last"])
    p.add_argument("--k", type=int, nargs="+", default=[1, 4])
    p.add_argument("--n-images", type=int, default=8, help="timed test images per repeat (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    print(f"threads {torch.get_num_threads()}, {a.device}, {a.n_images} images x {a.repeats} repeats, batch {a.batch}")
    print(f"{'backbone':20} {'px':>4} {'k':>2} {'method':20} {'s/image':>8} {'x knn':>6} {'bank MiB':>9}")
    for backbone in a.backbones:
        for k in a.k:
            for r in measure(backbone, k, a.n_images, min(a.batch, a.n_images), a.repeats, a.device):
                print(f"{r['backbone']:20} {r['px']:4d} {r['k']:2d} {r['method']:20} {r['s_per_image']:8.4f} "
                      f"{r['x_knn']:6.2f} {r['bank_mib']:9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
