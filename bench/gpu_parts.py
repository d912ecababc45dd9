"""The parts of bench/gpu_check.py, each run in a process of its own:

    python bench/gpu_parts.py SPEC.json

SPEC (written by gpu_check.py): {"part": "pipeline:fdsl", "result": path, "device": "cuda:0" or
"cpu", "settings": {...}, "peaks": {"fp32": FLOP/s, ...}, "inject": null | "fail" | "hang"}.
A part writes its figures to `result` as it goes (atomically, after every row), so a part cut off
at its cap keeps what it measured; an exception ends the part with its one-line error there.
A row that fails (one precision running out of memory, say) is recorded with its error and the
part goes on with the next one.

Every figure comes from the project's own code paths: test.py's `evaluate_category` through
bench_pipeline.run_one (fit, DataLoader with workers and pinned memory, predict, copy back,
metrics), train.py's reference fitting and data-parallel step, test.py under torchrun.
Backbones have random weights (`--pretrained none` for every role): time and memory do not
depend on the values.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for _p in (str(REPO), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from utils.io import atomic_write_json  # noqa: E402 - torch-free

# Python modules the project imports, with the pip name that provides each (requirements.txt)
REQUIRED = (("torch", "torch"), ("torchvision", "torchvision"), ("open_clip", "open_clip_torch"), ("timm", "timm"),
            ("numpy", "numpy"), ("scipy", "scipy"), ("sklearn", "scikit-learn"), ("skimage", "scikit-image"),
            ("cv2", "opencv-python-headless"), ("PIL", "pillow"), ("safetensors", "safetensors"), ("tqdm", "tqdm"),
            ("tabulate", "tabulate"), ("matplotlib", "matplotlib"), ("pytest", "pytest"))
# Tiny stand-ins by backbone kind for --dry-run (random, no download)
TINY = {"open_clip": "tiny_clip", "timm_vit": "tiny_dinov2", "timm_cnn": "tiny_cnn"}
# The methods the targets name come first; the rest of the registry follows in name order
FIRST = ("fdsl", "knn")
CATEGORY = "tiles"


def one_line(e: BaseException, limit: int = 400) -> str:
    text = str(e).strip().splitlines()
    line = f"{type(e).__name__}: {text[0] if text else ''}".strip().rstrip(":")
    return line if len(line) <= limit else line[:limit - 3] + "..."


class Recorder:
    """The part's result file, rewritten after every change."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.data = {"figures": {}, "rows": [], "notes": []}
        self.flush()

    def flush(self) -> None:
        atomic_write_json(self.path, self.data)

    def set(self, **figures) -> None:
        self.data["figures"].update(figures)
        self.flush()

    def row(self, **row) -> None:
        self.data["rows"].append(row)
        self.flush()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.flush()

    def skip(self, why: str) -> None:
        self.data["skipped"] = why
        self.flush()

    def fail(self, e: BaseException) -> None:
        self.data["error"] = one_line(e)
        self.data["traceback"] = traceback.format_exc(limit=-8)
        self.flush()


# -- shared pieces ------------------------------------------------------------------------------

def free_device() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def ordered_methods(names) -> list[str]:
    return [m for m in FIRST if m in names] + sorted(m for m in names if m not in FIRST)


def method_request(name: str, settings: dict):
    """The MethodConfig of a registry method at its own default backbones and size, random
    weights for every role; with settings["tiny"], each backbone replaced by the tiny one of its
    kind at settings["image_size"]."""
    from methods import load_method_config
    from models.backbones import load_backbone_config
    from utils.config import MethodConfig

    cfg = load_method_config(name)
    roles = list(cfg["backbones"])
    backbone = None
    if settings.get("tiny"):
        names = {}
        for role, spec in cfg["backbones"].items():
            kind = load_backbone_config(spec["config"] if isinstance(spec, dict) else spec).get("kind")
            if kind not in TINY:
                raise ValueError(f"method '{name}', backbone role '{role}': no tiny stand-in for kind '{kind}' "
                                 f"(known: {sorted(TINY)})")
            names[role] = TINY[kind]
        backbone = ",".join(f"{r}={n}" for r, n in names.items())
    return MethodConfig(name=name, backbone=backbone, pretrained=",".join(f"{r}=none" for r in roles),
                        image_size=settings.get("image_size"))


def build_method(name: str, settings: dict, device):
    import torch

    from methods import create_method, resolve_method_config

    torch.manual_seed(0)  # heads: the same random init in every part
    return create_method(resolve_method_config(method_request(name, settings)), device).eval()


def describe(method) -> str:
    return ", ".join(f"{role} {b.config.get('name')} ({b.config.get('model')})"
                     for role, b in method.backbones.items()) + f" at {method.image_size} px"


def supports_windows(method, settings: dict) -> bool:
    """Whether the method scores LFE windows (methods that do not refuse winmode 'mul')."""
    from methods.base import InferenceOptions

    try:
        method.configure(InferenceOptions(winmode="mul", win_size=settings["win_size"],
                                          win_stride=settings["win_stride"]))
        ok = True
    except ValueError:
        ok = False
    method.configure(InferenceOptions())
    return ok


def make_data(tmp: Path, n_test: int, settings: dict, n_train: int, categories=(CATEGORY,)) -> Path:
    from data.synthetic import generate

    return generate(tmp / "data", tuple(categories), seed=0, size=settings["data_size"], n_train=n_train,
                    n_test_good=n_test - n_test // 2, n_test_bad=n_test // 2)


def balanced_subset(meta: dict, cls: str, n: int) -> dict:
    """A copy of meta whose test split of `cls` keeps n images, half of them anomalous."""
    items = meta["test"][cls]
    good = [it for it in items if not it.get("anomaly")][:n - n // 2]
    bad = [it for it in items if it.get("anomaly")][:n // 2]
    return {**meta, "test": {**meta["test"], cls: good + bad}}


def precisions_for(device, wanted) -> tuple[list[str], list[str]]:
    """(precisions to run, precisions skipped on this device): fp16 runs on CUDA only."""
    run = [p for p in wanted if p != "fp16" or device.type == "cuda"]
    return run, [p for p in wanted if p not in run]


def peaks_for(spec: dict, device, precisions) -> dict[str, float]:
    """Peak FLOP/s per precision: the machine part's measured matmul rates, else measured here."""
    import torch

    from bench_lfe import matmul_rate

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    peaks = dict(spec.get("peaks") or {})
    for p in precisions:
        if p not in peaks:
            peaks[p] = matmul_rate(device, dtypes[p], spec["settings"]["matmul_n"])
    return peaks


def floor_flops(method, settings: dict, windows: bool) -> dict[str, dict]:
    """Backbone forward FLOPs of one test image per role (bench_pipeline's pieces): the closed
    form for CLIP ViTs, torch's FlopCounterMode otherwise."""
    import bench_pipeline as bp

    out = {}
    for role, bb in method.backbones.items():
        before = bb.precision
        bb.precision = "fp32"
        try:
            whole, win, n_win = bp.backbone_flops(bb, settings["win_size"], settings["win_stride"],
                                                  method.options.window_batch, windows)
        finally:
            bb.precision = before
        closed = bp.analytic_vit_flops(bb, settings["win_size"], settings["win_stride"])
        entry = {"counter_whole_gflop": whole / 1e9, "n_windows": n_win}
        if closed:
            whole, win = closed[0], (closed[1] if windows else 0.0)
            entry["source"] = "closed form"
        else:
            entry["source"] = "FlopCounterMode"
        entry.update(whole_gflop=whole / 1e9, windows_gflop=win / 1e9)
        out[role] = entry
    return out


def per_image_flops(flops: dict[str, dict], mode: str) -> float:
    return 1e9 * sum(v["whole_gflop"] + (v["windows_gflop"] if mode == "mul" else 0.0) for v in flops.values())


# -- parts --------------------------------------------------------------------------------------

def _requirement_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


def part_machine(spec: dict, rec: Recorder) -> None:
    """GPU, driver, CUDA, torch build, packages (missing ones named), matmul rates, methods."""
    import importlib
    import importlib.metadata
    import platform

    figures = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        figures["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                               text=True, timeout=10).stdout.strip() or "n/a"
    except (OSError, subprocess.SubprocessError):
        figures["git_commit"] = "n/a"
    packages, missing, mismatched = {}, [], []
    pins = _requirement_pins()
    where = {}
    for module, pip_name in REQUIRED:
        try:
            mod = importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - a broken install is as missing as an absent one
            missing.append(f"{pip_name} (import {module}: {one_line(e)})")
            continue
        if module in ("open_clip", "timm"):  # carried wheels or the machine's own
            where[module] = str(Path(mod.__file__).parent.parent)
        try:
            version = importlib.metadata.version(pip_name)
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        packages[pip_name] = version
        pin = pins.get(pip_name.lower())
        if pin and version.split("+")[0] != pin:
            mismatched.append(f"{pip_name} {version} (requirements.txt: {pin})")
    figures.update(packages=packages, missing_packages=missing, version_mismatches=mismatched, imported_from=where)
    rec.set(**figures)
    if mismatched:
        rec.note("versions differ from requirements.txt: " + ", ".join(mismatched))
    if "torch" not in packages:
        raise RuntimeError("torch does not import: nothing can be measured")

    import torch

    from bench_lfe import matmul_rate

    cuda = torch.cuda.is_available()
    figures = {"torch": torch.__version__, "torch_cuda": torch.version.cuda or "none (CPU build)",
               "cuda_available": cuda, "gpu_count": torch.cuda.device_count() if cuda else 0,
               "cudnn": torch.backends.cudnn.version() if cuda else None,
               "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
               "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if cuda:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            figures[f"gpu{i}"] = (f"{p.name}, {p.total_memory / 2 ** 30:.1f} GiB, compute capability "
                                  f"{p.major}.{p.minor}, {p.multi_processor_count} SMs")
        figures["bf16_native"] = torch.cuda.is_bf16_supported(including_emulation=False)
        try:
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
            import re

            m = re.search(r"Driver Version:\s*([\d.]+)", smi)
            figures["driver"] = m.group(1) if m else "n/a"
            m = re.search(r"CUDA Version:\s*([\d.]+)", smi)
            figures["driver_cuda"] = m.group(1) if m else "n/a"
        except (OSError, subprocess.SubprocessError) as e:
            figures["driver"] = f"n/a ({one_line(e)})"
    rec.set(**figures)

    from methods import METHODS, list_methods, load_method_config

    rec.set(methods=[{"name": m, "trainable": bool(METHODS[m].trainable),
                      "backbones": {r: (s["config"] if isinstance(s, dict) else s)
                                    for r, s in load_method_config(m)["backbones"].items()}}
                     for m in ordered_methods(list_methods())])
    device = torch.device(spec["device"])
    if device.type == "cuda" and not cuda:
        return  # gpu_check.py stops here with one line: nothing to measure
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    run, _ = precisions_for(device, ["fp32", "bf16", "fp16"])
    rates = {}
    for p in run:
        rates[p] = matmul_rate(device, dtypes[p], spec["settings"]["matmul_n"])
        rec.set(matmul_tflops={k: v / 1e12 for k, v in rates.items()})
    n = spec["settings"]["matmul_n"]
    rec.note(f"matmul rate: best of 5 products {n}x{n}x{n} per dtype, fp32 with TF32 "
             f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'} (torch's default: off)")


def part_cuda_tests(spec: dict, rec: Recorder) -> None:
    """`pytest -m cuda`: every test that needs a GPU (skipped on a CPU machine), JUnit outcomes."""
    import xml.etree.ElementTree as ET

    # collecting only the files that use the marker saves collecting the whole suite
    files = sorted(str(f.relative_to(REPO)) for f in (REPO / "tests").rglob("test_*.py")
                   if "mark.cuda" in f.read_text(encoding="utf-8", errors="replace"))
    if not files:
        raise RuntimeError("no test file under tests/ uses the cuda marker (pytest.mark.cuda)")
    with tempfile.TemporaryDirectory(prefix="gpu_check_pytest_") as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
               *files]
        rec.set(command="pytest -m cuda " + " ".join(files))
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)  # gpu_check's cap bounds it
        tail = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        if not junit.is_file():
            raise RuntimeError(f"pytest wrote no report (exit code {proc.returncode}): "
                               f"{tail[-1] if tail else 'no output'}")
        root = ET.parse(junit).getroot()
        counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
        for case in root.iter("testcase"):
            counts["tests"] += 1
            name = f"{case.get('classname', '')}::{case.get('name', '')}".lstrip(":")
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = {"failure": "failed", "error": "errors", "skipped": "skipped"}[child.tag]
                    message = (child.get("message") or child.text or "").strip().splitlines()
                    message = message[0][:300] if message else ""
                    break
            counts[outcome] += 1
            rec.row(test=name, outcome={"errors": "error"}.get(outcome, outcome), message=message)
    rec.set(exit_code=proc.returncode, **counts)
    if proc.returncode not in (0, 1, 5):  # 2 interrupted, 3 internal error, 4 usage error
        raise RuntimeError(f"pytest exit code {proc.returncode}: {tail[-1] if tail else 'no output'}")


def part_pipeline(spec: dict, rec: Recorder) -> None:
    """One method's whole test path (test.py's evaluate_category via bench_pipeline.run_one) per
    precision, mode and k: images/s, peak memory, and the backbone FLOP floor."""
    import torch

    import bench_pipeline as bp
    from data.dataset import load_meta
    from utils.config import TestConfig

    s, name = spec["settings"], spec["part"].split(":", 1)[1]
    device = torch.device(spec["device"])
    test_script = bp._load_test_script()
    t = time.perf_counter()
    method = build_method(name, s, device)
    modes = ["nan"] + (["mul"] if supports_windows(method, s) else [])
    rec.set(setup=f"{name}: {describe(method)}, random weights; modes {'/'.join(modes)}"
                  f"{' (mul = LFE windows %d/%d)' % (s['win_size'], s['win_stride']) if 'mul' in modes else ''}; "
                  f"{s['n_test_whole']} test images whole{', %d with windows' % s['n_test_mul'] if 'mul' in modes else ''}; "
                  f"batch {s['batch_size']}, "
                  f"{s['workers']} workers; eval {s['eval_size']} px; built in {time.perf_counter() - t:.1f} s",
            image_size=method.image_size, modes=modes)
    if "mul" not in modes:
        rec.note(f"{name} scores whole images only (it refuses winmode mul)")
    run, skipped = precisions_for(device, s["precisions"])
    for p in skipped:
        rec.row(method=name, precision=p, mode="all", skipped=f"{p} runs on CUDA only")
    with tempfile.TemporaryDirectory(prefix="gpu_check_pipeline_") as tmp:
        root = make_data(Path(tmp), s["n_test_whole"], s, n_train=max(s["shots"]))
        meta = load_meta(root)
        metas = {"nan": meta, "mul": balanced_subset(meta, CATEGORY, s["n_test_mul"])}
        warm = balanced_subset(meta, CATEGORY, 2)
        try:
            flops = floor_flops(method, s, "mul" in modes)
            rec.set(flops=flops)
            peaks = peaks_for(spec, device, run)
        except Exception as e:  # noqa: BLE001 - the timings do not need the floor
            flops, peaks = None, {}
            rec.note(f"no FLOP floor: {one_line(e)}")
        for prec in run:
            for mode in modes:
                def cfg(k):
                    return TestConfig(data_root=str(root), k_shot=k, winmode=mode, win_size=s["win_size"],
                                      win_stride=s["win_stride"], batch_size=s["batch_size"], workers=s["workers"],
                                      eval_size=s["eval_size"], precision=prec, device=spec["device"])
                # the caching allocator's reserve starts from this precision and mode alone (a reset peak
                # starts at the current reserve: blocks cached by an earlier row would count); the warm-up
                # fills it again, so the timed rows run with a warm cache, as test.py's categories do
                free_device()
                try:
                    bp.run_one(test_script, method, cfg(s["shots"][0]), root, warm, CATEGORY, device)  # warm-up
                except Exception as e:  # noqa: BLE001 - e.g. out of memory at one precision: go on
                    rec.row(method=name, precision=prec, mode=mode, k="", error=f"warm-up: {one_line(e)}")
                    free_device()
                    continue
                for k in s["shots"]:
                    try:
                        r = bp.run_one(test_script, method, cfg(k), root, metas[mode], CATEGORY, device)
                    except Exception as e:  # noqa: BLE001
                        rec.row(method=name, precision=prec, mode=mode, k=k, error=one_line(e))
                        free_device()
                        continue
                    row = {"method": name, "precision": prec, "mode": mode, "k": k,
                           "loop_images_per_s": 1.0 / r["predict_s_per_image"], **r}
                    if flops and prec in peaks:
                        row["floor_images_per_s"] = peaks[prec] / per_image_flops(flops, mode)
                        row["x_floor"] = row["floor_images_per_s"] / row["loop_images_per_s"]
                    rec.row(**row)
    rec.note("test loop img/s: read, predict and copy back of the category's test images (test.py's loop, "
             "starting the DataLoader workers included, once per category as in test.py); whole call img/s adds "
             "fitting the k references and the metrics; peak MiB reserved: the CUDA caching allocator's peak")


def predict_maps(method, root: Path, meta: dict, mode: str, precision: str, settings: dict):
    """Maps (N, eval_size, eval_size) and masks of the category's test images, 1-shot, at one precision."""
    import torch

    from data.dataset import AnomalyDataset, load_image, select_k_shot
    from methods.base import InferenceOptions

    method.configure(InferenceOptions(winmode=mode, win_size=settings["win_size"], win_stride=settings["win_stride"],
                                      precision=precision))
    refs = select_k_shot(meta, CATEGORY, 1, seed=0)
    state = method.fit(torch.stack([load_image(root / r["img_path"], method.image_size) for r in refs]),
                       [r["img_path"] for r in refs], settings["batch_size"])
    size = settings["eval_size"]
    ds = AnomalyDataset(root, "test", method.image_size, items=meta["test"][CATEGORY], mask_size=size)
    maps, masks, b = [], [], settings["batch_size"]
    for i in range(0, len(ds), b):
        samples = [ds[j] for j in range(i, min(i + b, len(ds)))]
        m, _ = method.predict(torch.stack([x["image"] for x in samples]).to(method.device), state, (size, size))
        maps.append(m.float().cpu())
        masks += [x["mask"] for x in samples]
    return torch.cat(maps), torch.stack(masks).numpy().ravel() > 0.5


def part_precision(spec: dict, rec: Recorder) -> None:
    """bf16 / fp16 maps against fp32 on the full-size backbones (every registry method, each
    mode it has): max and mean |diff|, pixel AUROC difference on generated defects."""
    import torch

    from data.dataset import load_meta
    from methods import list_methods
    from utils.metrics import auroc

    s = spec["settings"]
    device = torch.device(spec["device"])
    run, skipped = precisions_for(device, s["precisions"])
    others = [p for p in run if p != "fp32"]
    rec.set(setup=f"1-shot maps at {s['eval_size']} px of {s['n_test_precision']} generated test images (half with a "
                  f"defect), random weights; compared: {', '.join(others)} against fp32")
    for p in skipped:
        rec.note(f"{p}: runs on CUDA only, not compared here")
    with tempfile.TemporaryDirectory(prefix="gpu_check_precision_") as tmp:
        root = make_data(Path(tmp), s["n_test_precision"], s, n_train=1)
        meta = load_meta(root)
        for name in ordered_methods(list_methods()):
            try:
                method = build_method(name, s, device)
                modes = ["nan"] + (["mul"] if supports_windows(method, s) else [])
            except Exception as e:  # noqa: BLE001
                rec.row(method=name, mode="-", precision="-", error=one_line(e))
                continue
            for mode in modes:
                try:
                    ref, masks = predict_maps(method, root, meta, mode, "fp32", s)
                    a_ref = auroc(masks, ref.numpy().ravel())
                    for prec in others:
                        maps, _ = predict_maps(method, root, meta, mode, prec, s)
                        diff = (maps - ref).abs()
                        a = auroc(masks, maps.numpy().ravel())
                        rec.row(method=name, mode=mode, precision=prec, max_abs_diff=float(diff.max()),
                                mean_abs_diff=float(diff.mean()), p_auroc_fp32=100 * a_ref, p_auroc=100 * a,
                                p_auroc_diff=100 * (a - a_ref), map_range=float(ref.max() - ref.min()))
                except Exception as e:  # noqa: BLE001
                    rec.row(method=name, mode=mode, precision="-", error=one_line(e))
            del method
            free_device()
    rec.note("maps: each method's own anomaly map (knn 1 - cosine, FDSL and DCP-SFR probabilities); random "
             "weights, so real CLIP/DINOv2 activations (outlier channels) are not represented")


def part_train(spec: dict, rec: Recorder) -> None:
    """One training step per trainable method at full size (train.py's pieces: reference
    banks, data-parallel loss, Adam), backbones under autocast, heads in fp32: time and peak memory."""
    import torch

    from data.dataset import load_meta
    from methods import METHODS, list_methods
    from models.backbones import resolve_precision

    s = spec["settings"]
    device = torch.device(spec["device"])
    # what train.py runs by default on this device (auto: bf16 on a recent GPU); bf16 on the CPU
    precision = resolve_precision("auto" if device.type == "cuda" else "bf16", device)
    batch_size, steps = s["train_batch"], s["train_steps"]
    rec.set(setup=f"batch {batch_size} at each method's size, backbones under autocast {precision}, heads fp32; "
                  f"one warm-up step, then {steps} timed step(s) on one batch (no data loading)")
    trainable = [m for m in ordered_methods(list_methods()) if METHODS[m].trainable]
    with tempfile.TemporaryDirectory(prefix="gpu_check_train_") as tmp:
        root = make_data(Path(tmp), max(batch_size, 2), s, n_train=1)
        meta = load_meta(root)
        for name in trainable:
            try:
                rec.row(**_train_step(name, s, device, precision, root, meta))
            except Exception as e:  # noqa: BLE001
                rec.row(method=name, precision=precision, error=one_line(e))
            free_device()  # the method's tensors went with _train_step's frame


def _train_step(name: str, s: dict, device, precision: str, root: Path, meta: dict) -> dict:
    import torch

    import train
    from bench_lfe import PeakMemory, sync
    from data.dataset import AnomalyDataset
    from utils import distributed
    from utils.device import to_device

    batch_size, steps = s["train_batch"], s["train_steps"]
    method = build_method(name, s, device)
    method.set_precision(precision)
    training = method.config.get("training", {})
    states = train.fit_references(method, root, meta, [CATEGORY], 1, 0)
    ds = AnomalyDataset(root, "test", method.image_size, [CATEGORY], seed=0)
    batch = to_device(next(iter(distributed.train_loader(ds, batch_size, 0, 0, device))), device)
    step_loss = distributed.data_parallel(method, device, batch_size)
    params = method.trainable_parameters()
    optimizer = torch.optim.Adam(params, lr=float(training.get("lr", 1e-3)),
                                 betas=tuple(training.get("betas", (0.9, 0.999))))
    method.train()

    def step():
        loss = step_loss(batch, [states[c] for c in batch["cls_name"]])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    step()  # warm-up: kernels, optimizer state
    mem = PeakMemory(device)
    mem.start()
    sync(device)
    t = time.perf_counter()
    losses = [step() for _ in range(steps)]
    sync(device)
    seconds = time.perf_counter() - t
    peak = mem.stop()
    losses = torch.stack(losses).float()
    finite = bool(torch.isfinite(losses).all()) and all(bool(torch.isfinite(p.grad).all())
                                                        for p in params if p.grad is not None)
    row = {"method": name, "precision": precision, "batch": batch_size, "s_per_step": seconds / steps,
           "images_per_s": batch_size * steps / seconds, "peak_bytes": peak, "peak_total_bytes": peak + mem.base,
           "peak_reserved_bytes": torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None,
           "loss": float(losses.mean()), "finite": finite, "trainable_parameters": sum(p.numel() for p in params)}
    if not finite:
        row["error"] = "loss or gradients not finite"
    return row


def _metrics_gap(a: dict, b: dict) -> float:
    """Largest |difference| between two metrics.json files' per-category values."""
    gap = 0.0
    for cls, m in a["per_category"].items():
        for key, v in m.items():
            w = b["per_category"].get(cls, {}).get(key)
            if isinstance(v, (int, float)) and isinstance(w, (int, float)):
                gap = max(gap, abs(v - w))
            elif v != w:
                return float("inf")
    return gap


def part_torchrun(spec: dict, rec: Recorder) -> None:
    """test.py under torchrun, 1 process against N (one per GPU; 2 CPU processes in the dry run):
    wall time, speed-up, and whether the metrics are those of one process."""
    import torch

    s = spec["settings"]
    device = torch.device(spec["device"])
    if device.type == "cuda":
        nproc, dev = torch.cuda.device_count(), "cuda"
        if nproc < 2:
            rec.set(gpu_count=nproc)
            rec.skip(f"{nproc} GPU visible: the sharded test needs 2 or more")
            return
    else:
        nproc, dev = 2, "cpu"
    categories = [f"cat{i}" for i in range(2 * nproc)]
    method = s["torchrun_method"]
    rec.set(setup=f"test.py --method {method} (random weights{', tiny backbone' if s.get('tiny') else ''}), "
                  f"{len(categories)} generated categories x {s['torchrun_n_test']} test images, k=1, --device {dev}; "
                  f"wall time of the whole command (process start, model build, evaluation)", processes=nproc)
    with tempfile.TemporaryDirectory(prefix="gpu_check_torchrun_") as tmp:
        root = make_data(Path(tmp), s["torchrun_n_test"], s, n_train=1, categories=categories)
        results = {}
        env = {**os.environ, "FSAD_DIST_TIMEOUT": "300"}
        for n in (1, nproc):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                   str(REPO / "test.py"), "--data-root", str(root), "--dataset", "gen", "--method", method,
                   "--pretrained", "none", "--results-root", str(Path(tmp) / "results"), "--model-name", f"p{n}",
                   "--device", dev, "--k-shot", "1", "--workers", str(s["workers"]), "--force"]
            if s.get("tiny"):
                cmd += ["--backbone", TINY["open_clip"], "--image-size", str(s["image_size"])]
            t = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
            seconds = time.perf_counter() - t
            if proc.returncode != 0:
                lines = [x for x in proc.stderr.splitlines() if x.strip()]
                rec.row(processes=n, error=f"exit code {proc.returncode}: {lines[-1] if lines else 'no output'}")
                return
            results[n] = json.loads((Path(tmp) / "results" / f"p{n}" / "gen" / "1shot" / "seed0" /
                                     "metrics.json").read_text())
            row = {"processes": n, "seconds": seconds}
            if n != 1:
                single = next(r for r in rec.data["rows"] if r.get("processes") == 1)
                row["speedup"] = single["seconds"] / seconds
                gap = _metrics_gap(results[1], results[n])
                row["metrics_equal"] = "yes" if gap == 0 else f"max |diff| {gap:.2e}"
            rec.row(**row)


PARTS = {"machine": part_machine, "cuda_tests": part_cuda_tests, "pipeline": part_pipeline,
         "precision": part_precision, "train": part_train, "torchrun": part_torchrun}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    rec = Recorder(spec["result"])
    try:
        if spec.get("inject") == "hang":  # for the tests: a part that outlives its cap
            rec.note("injected hang (--inject-hang)")
            while True:
                time.sleep(60)
        if spec.get("inject") == "fail":  # for the tests: a part that fails
            raise RuntimeError("injected failure (--inject-fail)")
        if spec["device"].startswith("cuda") and spec["part"] != "machine":  # machine: checks CUDA itself
            import torch

            torch.cuda.set_device(torch.device(spec["device"]))
        if spec["settings"].get("threads"):
            import torch

            torch.set_num_threads(int(spec["settings"]["threads"]))
            os.environ["OMP_NUM_THREADS"] = str(spec["settings"]["threads"])  # subprocesses: pytest, torchrun
        PARTS[spec["part"].split(":", 1)[0]](spec, rec)
    except BaseException as e:  # noqa: BLE001 - every failure becomes the part's one-line error
        rec.fail(e)
        print(traceback.format_exc(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
