"""Whole test pipeline, fp32 against mixed precision, measured in one run.

    python bench/bench_pipeline.py                                   # tiny_clip on the CPU (bf16)
    python bench/bench_pipeline.py --backbone clip_vit_l14_336 --pretrained none --device 0

For each precision (fp32, then the mixed one: bf16, or fp16 on a GPU without bf16), each mode
(`nan`, and `mul` LFE at win 13 stride 2) and each k (1, 2, 4 shots), one generated category goes
through test.py's `evaluate_category`: the k references fitted (banks, window banks), test images
read by the DataLoader (workers, pinned memory on CUDA), predicted, copied to the host, image
scores and all metrics. Reported: images/s of that whole call, peak memory (bench_lfe.PeakMemory:
CUDA max_memory_allocated, or peak RSS on CPU) and the mixed/fp32 ratios of the same run. Heads
and weights are random (FDSL's heads untrained): time does not depend on the values.

FLOP floor: the backbone's forward FLOPs for one test image (whole image, plus all its windows for
`mul`): bench_lfe.vit_flops for CLIP ViTs, else counted with torch.utils.flop_counter on the real
forward (the counter is printed for CLIP too: it misses fused attention kernels, e.g. SDPA on CPU),
divided by the device's peak rate: `--peak-tflops FP32 [MIXED]`, by default a large matmul
measured in each dtype (bench_lfe.matmul_rate). It leaves out matching, heads, data and metrics,
so the measured rate can only be below it.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lfe import MiB, PeakMemory, matmul_rate, reexec_for_peak_rss, sync, vit_flops  # noqa: E402
from data.dataset import load_meta  # noqa: E402
from data.synthetic import generate  # noqa: E402
from methods import create_method, resolve_method_config  # noqa: E402
from models.backbones import resolve_precision  # noqa: E402
from models.lfe import WindowLayout, crop_windows  # noqa: E402
from utils.config import MethodConfig, TestConfig, resolve_device  # noqa: E402

_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _load_test_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "test.py"
    spec = importlib.util.spec_from_file_location("fsad_test_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def backbone_flops(backbone, win_size: int, win_stride: int, window_batch: int,
                   windows: bool = True) -> tuple[float, float, int]:
    """(whole image, all windows of one image, number of windows): forward FLOPs counted on the
    backbone at its own image size and current precision (windows: 0 FLOPs, 0 windows if False)."""
    from torch.utils.flop_counter import FlopCounterMode

    s, dev = backbone.image_size, backbone.mean.device
    x = torch.rand(1, 3, s, s, device=dev)
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel is invisible to the counter
    try:
        with FlopCounterMode(display=False) as fc:
            backbone(x)
        whole = float(fc.get_total_flops())
        if not windows:
            return whole, 0.0, 0
        layout = WindowLayout.make((s // backbone.patch_size,) * 2, win_size, win_stride)
        crops = crop_windows(x, layout, backbone.patch_size)
        with FlopCounterMode(display=False) as fc:
            for i in range(0, crops.shape[0], window_batch):
                backbone(crops[i:i + window_batch])
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return whole, float(fc.get_total_flops()), layout.n_windows


def analytic_vit_flops(backbone, win_size: int, win_stride: int) -> tuple[float, float] | None:
    """bench_lfe's closed form for open_clip ViTs (None for other backbones): (whole image, all
    windows of one image)."""
    v = getattr(backbone, "visual", None)
    if v is None or not hasattr(v, "transformer"):
        return None
    depth, width = len(v.transformer.resblocks), int(v.conv1.out_channels)
    mlp, ps = int(v.transformer.resblocks[0].mlp.c_fc.out_features), backbone.patch_size
    grid = backbone.image_size // ps
    n_win = WindowLayout.make((grid, grid), win_size, win_stride).n_windows
    return (vit_flops(grid * grid + 1, depth, width, mlp, ps),
            n_win * vit_flops(win_size * win_size + 1, depth, width, mlp, ps))


def run_one(test_script, method, cfg: TestConfig, root: Path, meta: dict, cls: str, device) -> dict:
    method.configure(test_script.inference_options(cfg))
    mem = PeakMemory(device)
    mem.start()
    sync(device)
    t = time.perf_counter()
    metrics, info = test_script.evaluate_category(method, cfg, root, meta, cls)
    sync(device)
    seconds = time.perf_counter() - t
    peak = mem.stop()
    # peak_total_bytes: the absolute peak (CUDA: everything allocated, weights included);
    # peak_reserved_bytes: what the CUDA caching allocator held at most (what the card must have)
    reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None
    return {"images_per_s": info["n_test"] / seconds, "predict_s_per_image": info["seconds_per_image"],
            "peak_bytes": peak, "peak_total_bytes": peak + mem.base, "peak_reserved_bytes": reserved,
            "p_auroc": metrics["p_auroc"], "mem_what": mem.what}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="tiny_clip")
    p.add_argument("--pretrained", default="none", help="'none' = random weights (timing only)")
    p.add_argument("--image-size", type=int, default=None, help="default: the backbone config's")
    p.add_argument("--device", default="cpu", help="cpu or a CUDA index")
    p.add_argument("--mixed", default="auto", choices=("auto", "bf16", "fp16"),
                   help="the mixed precision compared with fp32 (auto: bf16 where the device has it, else fp16; "
                        "bf16 on CPU)")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--modes", nargs="+", default=["nan", "mul"], choices=("nan", "mul"))
    p.add_argument("--win-size", type=int, default=13)
    p.add_argument("--win-stride", type=int, default=2)
    p.add_argument("--n-test", type=int, default=8, help="test images of the category (half of them defective)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 0 on CPU, 4 on CUDA)")
    p.add_argument("--data-size", type=int, default=256, help="side of the generated image files")
    p.add_argument("--peak-tflops", type=float, nargs="+", default=None, metavar=("FP32", "MIXED"),
                   help="the device's peak rate in TFLOP/s for fp32 and the mixed dtype (default: measured matmul)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    a = p.parse_args(argv)

    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    mixed = resolve_precision("bf16" if a.mixed == "auto" and device.type == "cpu" else a.mixed, device)
    precisions = ["fp32", mixed]
    workers = a.workers if a.workers is not None else (4 if device.type == "cuda" else 0)
    test_script = _load_test_script()

    torch.manual_seed(0)
    method = create_method(resolve_method_config(MethodConfig(name="fdsl", backbone=a.backbone,
                                                              pretrained=a.pretrained, image_size=a.image_size)),
                           device).eval()
    s, ps = method.image_size, method.backbone.patch_size
    grid = s // ps
    tmp = tempfile.TemporaryDirectory(prefix="bench_pipeline_")
    root = generate(Path(tmp.name) / "data", ("tiles",), seed=0, size=a.data_size, n_train=max(a.shots),
                    n_test_good=a.n_test - a.n_test // 2, n_test_bad=a.n_test // 2)
    meta = load_meta(root)
    threads = torch.get_num_threads() if device.type == "cpu" else None
    print(f"device {device}{f' ({threads} threads)' if threads else ''}, torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"backbone {a.backbone} (pretrained={a.pretrained}) at {s} px = {grid}x{grid} patches; FDSL heads "
          f"(random); {a.n_test} test images per category ({a.data_size} px files), batch {a.batch_size}, "
          f"{workers} workers; mul = win {a.win_size} stride {a.win_stride}; eval 240 px")

    rows = {}
    for prec in precisions:
        method.set_precision(prec)
        for mode in a.modes:
            def cfg(k):
                return TestConfig(data_root=str(root), k_shot=k, winmode=mode, win_size=a.win_size,
                                  win_stride=a.win_stride, batch_size=a.batch_size, workers=workers, precision=prec,
                                  device=a.device)
            run_one(test_script, method, cfg(a.shots[0]), root, meta, "tiles", device)  # warm-up: caches, kernels
            for k in a.shots:
                rows[(prec, mode, k)] = run_one(test_script, method, cfg(k), root, meta, "tiles", device)

    what = next(iter(rows.values()))["mem_what"]
    print(f"\n## whole pipeline (evaluate_category: fit + load + predict + metrics), images/s; peak memory: {what}")
    print(f"| mode | k | fp32 img/s | {mixed} img/s | {mixed}/fp32 speed | fp32 peak MiB | {mixed} peak MiB "
          f"| {mixed}/fp32 memory | predict s/img fp32 / {mixed} | p-AUROC fp32 / {mixed} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode in a.modes:
        for k in a.shots:
            f, m = rows[("fp32", mode, k)], rows[(mixed, mode, k)]
            mem_ratio = m["peak_bytes"] / f["peak_bytes"] if f["peak_bytes"] else float("nan")
            print(f"| {mode} | {k} | {f['images_per_s']:.2f} | {m['images_per_s']:.2f} | "
                  f"{m['images_per_s'] / f['images_per_s']:.2f}x | {f['peak_bytes'] / MiB:.1f} | "
                  f"{m['peak_bytes'] / MiB:.1f} | {mem_ratio:.2f} | {f['predict_s_per_image']:.4f} / "
                  f"{m['predict_s_per_image']:.4f} | {100 * f['p_auroc']:.2f} / {100 * m['p_auroc']:.2f} |")

    # -- FLOP floor
    method.set_precision("fp32")
    whole, windows, n_win = backbone_flops(method.backbone, a.win_size, a.win_stride, method.options.window_batch)
    closed = analytic_vit_flops(method.backbone, a.win_size, a.win_stride)
    if a.peak_tflops:
        peaks = {"fp32": a.peak_tflops[0] * 1e12, mixed: (a.peak_tflops[-1]) * 1e12}
        source = "given"
    else:
        n = 2048 if device.type == "cpu" else 8192
        peaks = {pr: matmul_rate(device, _DTYPE[pr], n) for pr in precisions}
        source = f"measured {n}x{n} matmul"
    print(f"\n## FLOP floor: backbone forward per test image; torch's counter: whole {whole / 1e9:.3f} GFLOP, "
          f"{n_win} windows {windows / 1e9:.3f} GFLOP")
    if closed:
        print(f"closed form used (bench_lfe.vit_flops, attention included): whole {closed[0] / 1e9:.3f} GFLOP, "
              f"windows {closed[1] / 1e9:.3f} GFLOP")
        whole, windows = closed
    print("peak (" + source + "): " + ", ".join(f"{pr} {r / 1e12:.3f} TFLOP/s" for pr, r in peaks.items()))
    print("| mode | precision | floor img/s (backbone only) | measured img/s k=1 | measured / floor |\n|---|---|---|---|---|")
    for mode in a.modes:
        flops = whole + (windows if mode == "mul" else 0.0)
        for prec in precisions:
            floor = peaks[prec] / flops
            got = rows[(prec, mode, a.shots[0])]["images_per_s"]
            print(f"| {mode} | {prec} | {floor:.2f} | {got:.2f} | {got / floor:.3f} |")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    reexec_for_peak_rss()
    sys.exit(main())
