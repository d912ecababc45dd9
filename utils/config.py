"""Run configuration: one dataclass per run, written into every results folder.

The launchers keep the authors' nine positional arguments; they are mapped here onto named
fields instead of the original ~40 integer switches.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

import torch

WINMODES = ("nan", "mul", "onlywin")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # backbone autocast (models/backbones/base.py)
IMAGE_INDEX = ("off", "windows", "all")


@dataclass
class MethodConfig:
    """Which method, and what to change from its JSON config (methods/configs/<name>.json)."""
    name: str = "fdsl"  # fdsl | dcpsfr | knn | subspacead, or a path to a method JSON
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
    train_k_shot: int = 10  # references per category while training (the authors' effective value)
    augment: str = "mosaic"  # mosaic (MVTec), crop (VisA) or none
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
    model_name: str = "fdsl"
    method: str | None = None  # None = the checkpoint's method; another one is refused
    # a training-free method's parameters over its JSON config (launchers: ABLATION; test.py --param);
    # a trained method keeps its checkpoint's
    method_params: dict = field(default_factory=dict)
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


def parse_method_params(pairs: list[str]) -> dict:
    """['augment_count=0', 'feature_norm=l2'] -> {'augment_count': 0, 'feature_norm': 'l2'}: each VALUE
    read as JSON (numbers, true/false, null, lists), else taken as a string."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--param '{pair}': expected NAME=VALUE, e.g. --param augment_count=0")
        try:
            out[name.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[name.strip()] = value
    return out


def check_seed(seed: int) -> None:
    """One rule for every entry point: seeds are integers >= 0. A negative seed would name a folder
    'seed-1' that the aggregator does not read, so it is refused before anything is written."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")


def validate_test(cfg: TestConfig) -> None:
    check_seed(cfg.seed)
    if cfg.winmode not in WINMODES:
        raise ValueError(f"winmode must be one of {WINMODES}, got '{cfg.winmode}'")
    if cfg.image_index not in IMAGE_INDEX:
        raise ValueError(f"image_index must be one of {IMAGE_INDEX}, got '{cfg.image_index}'")
    if not 0.0 <= cfg.win_weight <= 1.0:
        raise ValueError(f"win-weight must be in [0, 1], got {cfg.win_weight}")
    if cfg.k_shot < 1:
        raise ValueError(f"kshots must be >= 1, got {cfg.k_shot}")
    if cfg.eval_size < 0:
        raise ValueError(f"eval-size must be >= 0 (0 = original mask resolution), got {cfg.eval_size}")
    if cfg.save_images < -1:
        raise ValueError(f"save-images must be >= -1 (-1 = all images, 0 = off), got {cfg.save_images}")
    if str(cfg.precision).lower() not in PRECISIONS:
        raise ValueError(f"precision (--precision, FSAD_PRECISION) must be one of {', '.join(PRECISIONS)}, "
                         f"got '{cfg.precision}'")
    if str(cfg.precision).lower() == "fp16" and str(cfg.device).strip().lower() == "cpu":
        raise ValueError("precision fp16 is for CUDA GPUs without bf16; on CPU use bf16 or fp32")
    if cfg.workers < 0:
        raise ValueError(f"workers must be >= 0, got {cfg.workers}")


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


