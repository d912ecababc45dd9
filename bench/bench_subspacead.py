"""subspacead against knn on the same backbone object and the same inputs, in one process.

    python bench/bench_subspacead.py                                  # efficientnet_lite0 (real weights), random images
    python bench/bench_subspacead.py --data-root DIR --k 1 --rounds 5 # a dataset's own test images (MVTec layout meta.json)
    python bench/bench_subspacead.py --backbone tiny_dinov2 --pretrained none

Both methods wrap one backbone instance (knn is built around subspacead's), so features, weights and
precision are identical. Per round each method scores the same test images (batches of --batch,
after a warm-up batch); the rounds alternate the methods, and the median over rounds is reported,
so a machine that gets busier or quieter during the run affects both alike. Printed: seconds per
test image and their ratio (the target: subspacead within 1.5x of knn), the fit time of one
category (knn: the bank of the k references; subspacead: the k references and their rotated
copies), and the memory a category holds (knn: its bank; subspacead: mean, basis and eigenvalues).
On CUDA also each method's peak allocated memory while predicting.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load_inputs(data_root: str | None, k: int, n_images: int, size: int, seed: int):
    import torch

    if not data_root:
        g = torch.Generator().manual_seed(seed)
        return torch.rand(k, 3, size, size, generator=g), torch.rand(n_images, 3, size, size, generator=g), "random"
    from data.dataset import load_image, load_meta, select_k_shot

    root = Path(data_root)
    meta = load_meta(root)
    cls = sorted(meta["test"])[0]
    refs = [load_image(root / it["img_path"], size) for it in select_k_shot(meta, cls, k, seed)]
    tests = [load_image(root / it["img_path"], size) for it in meta["test"][cls][:n_images]]
    return torch.stack(refs), torch.stack(tests), f"{root.name}/{cls}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--pretrained", default=None, help="weights (default: the backbone config's)")
    p.add_argument("--data-root", default=None, help="MVTec-layout dataset with meta.json (default: random images)")
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--n-images", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default=None, help="fp32, bf16, fp16 or auto (default: leave the backbone as built)")
    a = p.parse_args(argv)

    import torch

    from methods import create_method, resolve_method_config
    from methods.base import InferenceOptions
    from methods.knn import KNNMethod
    from utils.config import MethodConfig, resolve_device

    dev = resolve_device(a.device)
    sub = create_method(resolve_method_config(MethodConfig(name="subspacead", backbone=a.backbone,
                                                           pretrained=a.pretrained)), dev).eval()
    knn = KNNMethod(sub.backbone, config={"method": "knn"}).eval()  # the same backbone object
    for m in (sub, knn):
        m.configure(InferenceOptions(precision=a.precision))
    refs, images, source = load_inputs(a.data_root, a.k, a.n_images + a.batch, sub.image_size, a.seed)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    out_size = (240, 240)

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        result = fn()
        sync()
        return time.perf_counter() - t0, result

    fit_s, states = {}, {}
    for name, m in (("knn", knn), ("subspacead", sub)):
        m.predict(images[:a.batch].to(dev), m.fit(refs, ["bench/train/good/x.png"] * a.k, a.batch), out_size)  # warm-up
        fit_s[name], states[name] = timed(lambda m=m: m.fit(refs, ["bench/train/good/x.png"] * a.k, a.batch))
    per_image = {"knn": [], "subspacead": []}
    peak = {}
    timed_images = images[a.batch:]
    for r in range(a.rounds):
        order = (("knn", knn), ("subspacead", sub)) if r % 2 == 0 else (("subspacead", sub), ("knn", knn))
        for name, m in order:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)

            def run(m=m, name=name):
                for s in range(0, timed_images.shape[0], a.batch):
                    m.predict(timed_images[s:s + a.batch].to(dev), states[name], out_size)
            seconds, _ = timed(run)
            per_image[name].append(seconds / timed_images.shape[0])
            if dev.type == "cuda":
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated(dev))
    med = {n: statistics.median(v) for n, v in per_image.items()}
    held = {"knn": knn.state_nbytes(states["knn"])["bank_bytes"],
            "subspacead": sub.state_nbytes(states["subspacead"])["subspace_bytes"]}
    s = states["subspacead"].subspace
    print(f"backbone {a.backbone} at {sub.image_size} px (precision {sub.precision or 'as built'}), device {dev}, "
          f"inputs {source}: k={a.k}, {timed_images.shape[0]} test images in batches of {a.batch}, "
          f"median of {a.rounds} alternating rounds")
    print(f"subspace: rank {s.rank} of {sub.feature_dim} dims ({s.explained:.3f} of the variance), "
          f"fitted on {s.n_samples} patch features of {states['subspacead'].n_references} images")
    print("| method | s / test image | ratio to knn | fit one category (s) | held per category (MiB) |"
          + (" peak predict (MiB) |" if peak else ""))
    print("|---|---|---|---|---|" + ("---|" if peak else ""))
    for n in ("knn", "subspacead"):
        row = f"| {n} | {med[n]:.4f} | {med[n] / med['knn']:.2f} | {fit_s[n]:.2f} | {held[n] / 2 ** 20:.3f} |"
        print(row + (f" {peak[n] / 2 ** 20:.0f} |" if peak else ""))
    print("per round (s / image): " + "; ".join(f"{n} " + ", ".join(f"{v:.4f}" for v in per_image[n])
                                                 for n in per_image))
    return 0


if __name__ == "__main__":
    sys.exit(main())
