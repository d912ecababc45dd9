"""LFE cost: per-image test time and peak memory per window mode, bank sizes, and the FLOP floor.

    python bench/bench_lfe.py                       # tiny_clip at 518 px, win 13 stride 2 (169 windows)
    python bench/bench_lfe.py --backbone clip_vit_l14_336 --pretrained none --n-images 1 \
        --modes nan mul mul-index

Heads and backbone weights are random: time and memory do not depend on the values. Modes:
nan (whole image only), mul without / with the image-feature index, and a one-by-one baseline
(the same code with window_batch=1, so every window gets its own backbone forward, as in the
authors' loop) compared with its batched counterpart.

Memory: on CUDA, torch.cuda.max_memory_allocated above the allocation at the start of the mode.
On CPU, the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) above its
resident set at the start of the mode. So that freed tensors leave the resident set (and the
next mode's peak is not hidden by pages glibc kept), the script re-executes itself with
MALLOC_MMAP_THRESHOLD_=131072: every allocation above 128 KiB is its own mapping, returned to
the system when freed. Small allocations and library caches still count, so on CPU the figure
is the extra resident memory the mode needed, within a few MiB.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from methods.fdsl import FDSLMethod  # noqa: E402
from models.backbones import create_backbone  # noqa: E402
from models.fdsl import FDSL  # noqa: E402
from models.lfe import WindowLayout, WindowScorer, blend  # noqa: E402

MiB = 2 ** 20
MODES = ("nan", "mul", "mul-index", "onlywin", "baseline")


# -- memory ----------------------------------------------------------------------------------

def _status_kib(key: str) -> int | None:
    try:
        m = re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) if m else None


class PeakMemory:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.what = "CUDA max_memory_allocated above start" if self.cuda else "peak RSS (VmHWM) above start"
        self.base = 0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        try:  # '5' resets the peak RSS to the current RSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
            self.base = _status_kib("VmRSS") * 1024
        except (OSError, TypeError):
            # fallback: ru_maxrss only grows, so this counts only a new process-wide peak
            self.what = "ru_maxrss growth (new process peak only)"
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def stop(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        hwm = _status_kib("VmHWM") if self.what.startswith("peak RSS") else None
        peak = hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(peak - self.base, 0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# -- FLOPs -----------------------------------------------------------------------------------

def vit_flops(tokens: int, depth: int, width: int, mlp: int, patch: int) -> float:
    """Forward FLOPs (2 per multiply-add) of a ViT on `tokens` tokens (CLS included)."""
    per_block = 2 * tokens * (4 * width ** 2 + 2 * width * mlp) + 4 * tokens ** 2 * width
    embed = 2 * (tokens - 1) * 3 * patch ** 2 * width
    return depth * per_block + embed


def lfe_flops(grid: int, win: int, stride: int, depth: int, width: int, mlp: int, patch: int) -> tuple[float, float, int]:
    """(window forwards, whole-image forward, number of windows) for one test image."""
    n_win = WindowLayout.make((grid, grid), win, stride).n_windows
    return (n_win * vit_flops(win * win + 1, depth, width, mlp, patch),
            vit_flops(grid * grid + 1, depth, width, mlp, patch), n_win)


def matching_flops(n_win: int, n_tok: int, k: int, width: int, layers: int, index: bool) -> float:
    """Similarity matmuls of all query windows of one image against the window bank."""
    matched = n_tok if index else k * n_win * n_tok
    return 2.0 * layers * n_win * n_tok * matched * width + (2.0 * n_win * k * n_win * width if index else 0)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, reps: int = 5) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


# -- bench -----------------------------------------------------------------------------------

def run_mode(name, detector, whole_bank, scorer, images, batch_size, out_size, device, winmode):
    """Per-image seconds and peak memory of the test loop of one mode (banks already built)."""
    def step(x):
        whole_map = whole_score = win_map = win_score = None
        if winmode != "onlywin":
            whole_map, whole_score = detector.predict_whole(x, whole_bank, out_size)
        if scorer is not None:
            win_map, win_score = scorer.predict(x, out_size)
        return blend(winmode, 0.5, whole_map, whole_score, win_map, win_score)

    # no warm-up needed: building the banks already ran both resolutions (positional caches)
    mem = PeakMemory(device)
    mem.start()
    sync(device)
    t = time.perf_counter()
    for s in range(0, images.shape[0], batch_size):
        m, _ = step(images[s:s + batch_size])
        m.cpu()
    sync(device)
    sec = (time.perf_counter() - t) / images.shape[0]
    return {"mode": name, "s_per_image": sec, "peak_bytes": mem.stop(), "mem_what": mem.what}


def bank_sizes(k: int, grid: int, n_win: int, win: int, layer_dims, embed_dim: int, itemsize: int = 4):
    whole = itemsize * k * (grid * grid * sum(layer_dims) + embed_dim)
    window = itemsize * k * n_win * (win * win * sum(layer_dims) + embed_dim)
    return whole, window


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="tiny_clip")
    p.add_argument("--pretrained", default="none", help="'none' = random weights (timing only)")
    p.add_argument("--image-size", type=int, default=518)
    p.add_argument("--device", default="cpu")
    p.add_argument("--k", type=int, default=1, help="shots for the timed runs")
    p.add_argument("--n-images", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--win-size", type=int, default=13)
    p.add_argument("--win-stride", type=int, default=2)
    p.add_argument("--window-batch", type=int, default=64)
    p.add_argument("--out-size", type=int, default=240)
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (0 = torch default); on a loaded machine 1 avoids OpenMP barrier stalls")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                   help="modes to time; 'baseline' = mul-index with one window per forward")
    a = p.parse_args(argv)

    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device if a.device == "cpu" or a.device.startswith("cuda") else f"cuda:{a.device}")
    torch.manual_seed(0)
    backbone = create_backbone(a.backbone, device, a.pretrained, a.image_size)
    detector = FDSLMethod(backbone, FDSL(backbone.layer_dims, use_nam=True).to(device)).eval()
    v = backbone.visual
    depth, width = len(v.transformer.resblocks), int(v.conv1.out_channels)
    mlp = int(v.transformer.resblocks[0].mlp.c_fc.out_features)
    ps, S = backbone.patch_size, backbone.image_size
    grid = S // ps
    layout = WindowLayout.make((grid, grid), a.win_size, a.win_stride)
    W, n = layout.n_windows, layout.n_tokens
    out_size = (a.out_size, a.out_size)
    threads = torch.get_num_threads() if device.type == "cpu" else None
    print(f"device {device}{f' ({threads} threads)' if threads else ''}, torch {torch.__version__}")
    print(f"backbone {a.backbone} (pretrained={a.pretrained}): depth {depth}, width {width}, mlp {mlp}, "
          f"layers {backbone.layers}; image {S} px = {grid}x{grid} patches")
    print(f"windows: {a.win_size} patches ({a.win_size * ps} px), stride {a.win_stride} -> {W} windows of "
          f"{n} tokens; window_batch {a.window_batch}; k={a.k}; {a.n_images} test images, batch {a.batch_size}")

    g = torch.Generator().manual_seed(1)
    refs = torch.rand(4, 3, S, S, generator=g).to(device)
    images = torch.rand(a.n_images, 3, S, S, generator=g).to(device)

    # -- timed modes
    print(f"load average at start: {os.getloadavg()[0]:.2f} (other processes share the CPU when > 0)")
    t = time.perf_counter()
    whole_bank = detector.build_bank(refs[:a.k])
    sync(device)
    t_whole_bank = time.perf_counter() - t
    # one window bank serves every scorer: the index changes matching, not what is stored
    scorers = {key: WindowScorer(detector, a.win_size, a.win_stride, use_image_index=index, window_batch=wb)
               for key, index, wb in (("full", False, a.window_batch), ("index", True, a.window_batch),
                                      ("one", True, 1))}
    t = time.perf_counter()
    win_bank = scorers["full"].build_bank(refs[:a.k])
    sync(device)
    t_win_bank = time.perf_counter() - t
    for sc in scorers.values():
        sc.bank = win_bank
    plan = {"nan": ("nan (whole image)", None, "nan"), "mul": ("mul, no index", "full", "mul"),
            "mul-index": ("mul, index", "index", "mul"), "onlywin": ("onlywin, index", "index", "onlywin"),
            "baseline": ("mul, index, one window per forward", "one", "mul")}
    rows = {m: run_mode(plan[m][0], detector, whole_bank, scorers.get(plan[m][1]), images, a.batch_size,
                        out_size, device, plan[m][2]) for m in MODES if m in a.modes}
    mem_what = next(iter(rows.values()))["mem_what"] if rows else ""
    print(f"\n## test time per image ({mem_what}; load average now {os.getloadavg()[0]:.2f})")
    print("| mode | s / image | peak MiB |\n|---|---|---|")
    for r in rows.values():
        print(f"| {r['mode']} | {r['s_per_image']:.3f} | {r['peak_bytes'] / MiB:.1f} |")
    print(f"bank build (k={a.k}, once per category): whole {t_whole_bank:.2f} s, windows {t_win_bank:.2f} s "
          f"(window_batch {a.window_batch})")
    if "baseline" in rows and "mul-index" in rows:
        base, batched = rows["baseline"]["s_per_image"], rows["mul-index"]["s_per_image"]
        print(f"batched vs one-by-one (mul, index): {base / batched:.2f}x faster "
              f"({batched:.3f} vs {base:.3f} s/image)")

    # -- bank sizes
    print(f"\n## bank per category, {a.backbone} at {S} px (fp32; the index shrinks the matched set, not storage)")
    print("| k | whole bank MiB | window bank MiB | matched / query patch: whole full, index "
          "| matched / query window: full, index |\n|---|---|---|---|---|")
    for k in (1, 2, 4):
        wb_, wwb = bank_sizes(k, grid, W, a.win_size, backbone.layer_dims, backbone.embed_dim)
        print(f"| {k} | {wb_ / MiB:.2f} | {wwb / MiB:.2f} | {k * grid * grid} , {grid * grid} "
              f"| {k * W * n} , {n} |")
    measured = (whole_bank.nbytes(), win_bank.nbytes())
    expected = bank_sizes(a.k, grid, W, a.win_size, backbone.layer_dims, backbone.embed_dim)
    print(f"check k={a.k}: built banks hold {measured[0]} and {measured[1]} bytes "
          f"({'= formula' if tuple(measured) == tuple(expected) else f'formula says {expected}'})")
    lw, lwin = bank_sizes(1, 37, 169, 13, [1024] * 4, 768)
    print(f"ViT-L/14 @ 518, win 13/2 (formula): whole {lw / MiB:.1f} MiB and window {lwin / MiB:.1f} MiB per shot; "
          f"matched per query window {169 * 169} x k tokens without index, 169 with it")

    # -- FLOP floor
    print("\n## arithmetic floor")
    rates = {"fp32": matmul_rate(device, torch.float32, 2048 if device.type == "cpu" else 8192)}
    if device.type == "cuda":
        rates["fp16"] = matmul_rate(device, torch.float16, 8192)
    print("measured matmul rate: " + ", ".join(f"{k_} {v_ / 1e9:.1f} GFLOP/s" for k_, v_ in rates.items()))
    f_win, f_whole, nw = lfe_flops(37, 13, 2, 24, 1024, 4096, 14)
    print(f"ViT-L/14 @ 518, win 13 stride 2: {nw} windows x {13 * 13 + 1} tokens = {f_win / 1e12:.2f} TFLOP, "
          f"whole image {f_whole / 1e12:.2f} TFLOP, total {(f_win + f_whole) / 1e12:.2f} TFLOP per test image")
    for k_, r_ in rates.items():
        print(f"  floor at {k_} rate: {(f_win + f_whole) / r_:.2f} s / image "
              f"(windows {f_win / r_:.2f} s + whole {f_whole / r_:.2f} s)")
    for k in (1, 2, 4):
        full, idx = (matching_flops(169, 169, k, 1024, 4, ix) for ix in (False, True))
        print(f"  + window matching, k={k}: {full / 1e12:.2f} TFLOP without index "
              f"({full / rates['fp32']:.2f} s fp32), {idx / 1e12:.3f} TFLOP with it")
    # floor of the configuration just measured (backbone + matching + ASL heads), to compare with it
    c_win, c_whole, _ = lfe_flops(grid, a.win_size, a.win_stride, depth, width, mlp, ps)
    head_macs = sum(m.in_features * m.out_features for m in detector.heads.heads.modules()
                    if isinstance(m, torch.nn.Linear))  # per token, summed over layers
    c_heads = 2.0 * head_macs * (W * n + grid * grid)
    c_match = {ix: matching_flops(W, n, a.k, width, len(backbone.layers), ix) for ix in (False, True)}
    r32 = rates["fp32"]
    for mode, ix in (("mul", False), ("mul-index", True)):
        if mode not in rows:
            continue
        total = c_win + c_whole + c_heads + c_match[ix]
        got = rows[mode]["s_per_image"]
        print(f"this run, {rows[mode]['mode']}: measured {got:.3f} s / image, fp32 floor {total / r32:.3f} s "
              f"(backbone {(c_win + c_whole) / 1e12:.3f} + matching {c_match[ix] / 1e12:.3f} + heads "
              f"{c_heads / 1e12:.3f} TFLOP) -> {got * r32 / total:.1f}x the floor")
    return 0


def reexec_for_peak_rss() -> None:
    """Restart this script with MALLOC_MMAP_THRESHOLD_ set (once): see the module docstring, freed
    tensors must leave the resident set for the CPU peak-memory figures to mean anything."""
    if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
        os.execv(sys.executable, [sys.executable] + sys.argv)


if __name__ == "__main__":
    reexec_for_peak_rss()
    sys.exit(main())
