"""Run configuration: one dataclass per run, written into every results folder.

The launchers keep the authors' nine positional arguments; they are mapped here onto named
fields instead of the original ~40 integer switches.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

import torch

WINMODES = ("nan", "mul", "onlywin")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # backbone autocast (models/backbones/base.py)
IMAGE_INDEX = ("off", "windows", "all")


@dataclass
class MethodConfig:
    """Which method, and what to change from its JSON config (methods/configs/<name>.json)."""
    name: str = "fdsl"  # fdsl | dcpsfr | knn | anomalydino | subspacead, or a path to a method JSON
    # None = the method config's backbones; "NAME" replaces its first backbone, "role=NAME,..." any
    backbone: str | None = None
    pretrained: str | None = None  # weights tag or local file, same syntax; None = each backbone config's
    image_size: int | None = None  # None = the backbone configs' value (518 for the paper's models)
    params: dict = field(default_factory=dict)  # method parameters, e.g. {"use_nam": False}


@dataclass
class TrainConfig:
    data_root: str = ""
    dataset: str = "mvtec"  # a name for folders and logs
    out_dir: str = ""  # checkpoints go here
    method: MethodConfig = field(default_factory=MethodConfig)
    classes: list[str] | None = None
    seed: int = 0
    epochs: int = 5
    batch_size: int = 8
    lr: float | None = None  # None = the method config's training.lr
    betas: tuple[float, float] | None = None  # None = the method config's training.betas
    # None = the method config's training.train_k_shot / training.augment, else 10 and mosaic
    # (FDSL's authors' effective values); train.resolve_training fills them in
    train_k_shot: int | None = None  # references per category while training
    augment: str | None = None  # mosaic (MVTec), crop (VisA) or none
    mosaic_p: float = 0.3
    crop_p: float = 0.6
    crop_plus: float = 0.6
    workers: int = 0
    device: str = "cpu"  # cpu, a CUDA index, or (several processes) an index list such as 0,1
    max_steps: int | None = None  # stop an epoch early (smoke tests)
    precision: str = "auto"  # backbone autocast: auto|fp32|bf16|fp16; a run records the resolved value


@dataclass
class TestConfig:
    __test__ = False  # a config, not a pytest test class

    data_root: str = ""
    dataset: str = "visa"
    checkpoint: str = ""  # trained methods; "" for a training-free method (then `method` is required)
    results_root: str = "results"
    model_name: str = ""  # results folder name; "" = the method's name (test.py model_name())
    method: str | None = None  # None = the checkpoint's method; another one is refused
    # None = what the checkpoint was trained with; a different backbone is refused when loading
    backbone: str | None = None
    pretrained: str | None = None
    image_size: int | None = None
    classes: list[str] | None = None
    seed: int = 0
    k_shot: int = 1
    winmode: str = "nan"
    win_size: int = 13
    win_stride: int = 2
    win_weight: float = 0.5
    image_index: str = "windows"  # where the image-feature index memory bank is used
    eval_size: int = 240  # 0 = the masks' own resolution
    fpr_limit: float = 0.3
    batch_size: int = 8
    device: str = "cpu"  # cpu, a CUDA index, or (several processes) an index list such as 0,1
    precision: str = "auto"  # backbone autocast: auto|fp32|bf16|fp16; a run records the resolved value
    workers: int = 0  # DataLoader workers reading test images
    save_images: int = 0  # per category, panels of the N most wrong normal/anomalous images; -1 = all, 0 = off
    # N > 0: thresholds calibrated on N normal train photos that are not references (utils/calibration.py)
    calibrate: int = 0
    # training-free methods: parameter overrides of the method config (a checkpoint's are fixed by training)
    params: dict = field(default_factory=dict)


def parse_params(items: list[str]) -> dict:
    """--param values ['use_nam=false', 'lam=0.5'] -> {'use_nam': False, 'lam': 0.5} (values are JSON,
    else strings)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param '{item}': expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def check_int(value, option: str, minimum: int, optional: bool = False) -> None:
    """An integer setting >= minimum (None allowed when optional), else ValueError naming the option."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{option} must be an integer >= {minimum}, got {value!r}")


def check_number(value, option: str, low: float, high: float = math.inf, low_open: bool = False,
                 optional: bool = False) -> None:
    """A finite number in [low, high] ((low, high] with low_open), else ValueError naming the option."""
    if value is None and optional:
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) \
        and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]" if math.isfinite(high) else \
            f"{'> ' if low_open else '>= '}{low:g}"
        raise ValueError(f"{option} must be a finite number {'in ' if math.isfinite(high) else ''}{bounds}, "
                         f"got {value!r}")



def check_seed(seed: int) -> None:
    """One rule for every entry point: seeds are integers >= 0. A negative seed would name a folder
    'seed-1' that the aggregator does not read, so it is refused before anything is written."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")


def validate_train(cfg: TrainConfig) -> None:
    """Every numeric setting of a training run, checked before any model is built or folder created."""
    check_seed(cfg.seed)
    check_int(cfg.epochs, "--epochs", 1)
    check_int(cfg.batch_size, "--batch-size", 1)
    check_int(cfg.train_k_shot, "--train-k-shot", 1, optional=True)
    check_int(cfg.workers, "--workers", 0)
    check_int(cfg.max_steps, "--max-steps", 1, optional=True)
    check_number(cfg.lr, "--lr", 0.0, low_open=True, optional=True)
    check_image_size(cfg.method.image_size if isinstance(cfg.method, MethodConfig) else None)
    for name in ("mosaic_p", "crop_p", "crop_plus"):
        check_number(getattr(cfg, name), name, 0.0, 1.0)
    if cfg.betas is not None:
        if len(cfg.betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {cfg.betas!r}")
        for b in cfg.betas:
            check_number(b, "betas", 0.0, 1.0)


def check_image_size(size) -> None:
    check_int(size, "--image-size", 1, optional=True)


def validate_test(cfg: TestConfig) -> None:
    check_seed(cfg.seed)
    check_int(cfg.k_shot, "--k-shot", 1)
    check_int(cfg.batch_size, "--batch-size", 1)
    check_int(cfg.win_size, "--win-size", 1)
    check_int(cfg.win_stride, "--win-stride", 1)
    check_int(cfg.eval_size, "--eval-size (0 = the masks' own resolution)", 0)
    check_int(cfg.save_images, "--save-images (-1 = all images, 0 = off)", -1)
    check_int(cfg.workers, "--workers", 0)
    check_int(cfg.calibrate, "--calibrate (normal train photos besides the references; 0 = off)", 0)
    check_number(cfg.win_weight, "--win-weight", 0.0, 1.0)
    check_number(cfg.fpr_limit, "--fpr-limit", 0.0, 1.0, low_open=True)
    check_image_size(cfg.image_size)
    if cfg.winmode not in WINMODES:
        raise ValueError(f"winmode must be one of {WINMODES}, got '{cfg.winmode}'")
    if cfg.image_index not in IMAGE_INDEX:
        raise ValueError(f"image_index must be one of {IMAGE_INDEX}, got '{cfg.image_index}'")
    if str(cfg.precision).lower() not in PRECISIONS:
        raise ValueError(f"precision (--precision, FSAD_PRECISION) must be one of {', '.join(PRECISIONS)}, "
                         f"got '{cfg.precision}'")
    if str(cfg.precision).lower() == "fp16" and str(cfg.device).strip().lower() == "cpu":
        raise ValueError("precision fp16 is for CUDA GPUs without bf16; on CPU use bf16 or fp32")
    if not isinstance(cfg.params, dict):
        raise ValueError(f"params must be an object of method parameters, got {cfg.params!r}")


def resolve_device(device: str | int) -> torch.device:
    """'cpu', a CUDA index ('0') or a torch device string ('cuda:1'). In a process started by
    torchrun: this rank's device ('cpu', 'cuda' = GPU LOCAL_RANK, or its entry of a list such as
    '0,1'), and the process joins the process group (utils/distributed.py)."""
    from utils import distributed

    if distributed.launched() or "," in str(device):
        dev = distributed.rank_device(str(device))
        distributed.init(dev)
        return dev
    return resolve_single_device(device)


def resolve_single_device(device: str | int) -> torch.device:
    """One process's device: 'cpu', a CUDA index ('0') or a torch device string ('cuda:1')."""
    d = str(device).strip().lower()
    if d == "cpu":
        return torch.device("cpu")
    if d.isdigit():
        d = f"cuda:{d}"
    if d.startswith("cuda"):
        try:
            torch.device(d)
        except RuntimeError:
            raise ValueError(f"device must be 'cpu' or a CUDA index such as 0, got '{device}'") from None
        if not torch.cuda.is_available():
            raise ValueError(f"device '{device}' asks for CUDA, but this machine has no usable CUDA GPU "
                             f"(torch.cuda.is_available() is False); pass 'cpu' instead")
        idx = torch.device(d).index or 0
        if idx >= torch.cuda.device_count():
            raise ValueError(f"device '{device}': CUDA index {idx} does not exist "
                             f"({torch.cuda.device_count()} GPU(s) visible)")
        return torch.device(d)
    raise ValueError(f"device must be 'cpu' or a CUDA index such as 0, got '{device}'")


def to_dict(cfg) -> dict:
    return asdict(cfg)


def from_dict(cls, data: dict):
    """Rebuild a config from its JSON form, ignoring keys a newer version may have added."""
    names = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in data.items() if k in names}
    if cls is TrainConfig and isinstance(kwargs.get("method"), dict):
        kwargs["method"] = from_dict(MethodConfig, kwargs["method"])
    return cls(**kwargs)


def as_json(obj):
    """The value as it reads back from a JSON file (tuples become lists), for comparing a stored
    configuration with a live one."""
    return json.loads(json.dumps(obj))


def effective_test_settings(test: dict) -> dict:
    """A test configuration (as a dict) with the settings its winmode ignores made canonical, so two
    runs that compute the same numbers compare equal: `nan` uses no window setting and the index
    only with image_index 'all'; `onlywin` has no blend weight and no whole-image pass."""
    t = dict(test)
    mode, index = t.get("winmode", "nan"), t.get("image_index", "windows")
    if mode == "nan":
        t.update(win_size=None, win_stride=None, win_weight=None, image_index="all" if index == "all" else "off")
    elif mode == "onlywin":
        t.update(win_weight=None, image_index="off" if index == "off" else "windows")
    return t


def precision_difference(stored: str, current: str) -> str:
    """The 'differs in' entry of a results or checkpoint folder of another precision, with how to
    continue the stored run (instead of deleting it)."""
    return (f"precision: stored {stored}, this run {current}; --precision {stored} (launchers: "
            f"FSAD_PRECISION={stored}) continues it")


def differing_keys(stored: dict, current: dict, keys) -> list[str]:
    """Keys whose values differ between a stored and a current configuration."""
    a, b = as_json(stored), as_json(current)
    return [k for k in keys if a.get(k) != b.get(k)]


