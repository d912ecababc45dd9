"""The cross-dataset protocol behind trainAndTest.sh and test_few_shot.sh.

    python launch.py {train_and_test|test} model_name device useNAM winmode win-size win-stride win-weight seed kshots

Train on MVTec AD -> test on VisA; train on VisA -> test on MVTec AD. Paths, backbone and
schedule come from environment variables (README, "Launchers"), so the nine positional
arguments stay those of the authors' scripts.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from utils.cli import run_cli
from utils.config import WINMODES, ModelConfig, TestConfig, TrainConfig

POSITIONAL = ("model_name", "device", "useNAM", "winmode", "win-size", "win-stride", "win-weight", "seed", "kshots")
USAGE = ("usage: bash trainAndTest.sh|test_few_shot.sh model_name device useNAM winmode win-size win-stride "
         "win-weight seed kshots\n  e.g. bash trainAndTest.sh fdsl 0 1 nan 13 2 0.5 14 1")


@dataclass
class Launch:
    model_name: str
    device: str
    use_nam: bool
    winmode: str
    win_size: int
    win_stride: int
    win_weight: float
    seed: int
    k_shot: int


def _num(name: str, value: str, kind):
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"argument {name}: expected {'an integer' if kind is int else 'a number'}, got '{value}'\n{USAGE}")


def parse_positional(args: list[str]) -> Launch:
    if len(args) != len(POSITIONAL):
        raise ValueError(f"expected {len(POSITIONAL)} arguments ({' '.join(POSITIONAL)}), got {len(args)}\n{USAGE}")
    name, device, nam, winmode, size, stride, weight, seed, k = args
    if nam not in ("0", "1"):
        raise ValueError(f"argument useNAM: expected 0 or 1, got '{nam}'")
    if winmode not in WINMODES:
        raise ValueError(f"argument winmode: expected one of {', '.join(WINMODES)}, got '{winmode}'")
    if not name or "/" in name:
        raise ValueError(f"argument model_name: a folder name without '/', got '{name}'")
    launch = Launch(name, device, nam == "1", winmode, _num("win-size", size, int), _num("win-stride", stride, int),
                    _num("win-weight", weight, float), _num("seed", seed, int), _num("kshots", k, int))
    if launch.k_shot < 1:
        raise ValueError(f"argument kshots: expected >= 1, got {launch.k_shot}")
    return launch


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or default


def _env_int(name: str, default: str | None = None) -> int | None:
    value = _env(name, default)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}: expected an integer, got '{value}'") from None


REPO = Path(__file__).resolve().parent


@dataclass
class DatasetSpec:
    name: str  # results folder name
    root: str
    root_env: str  # the variable that sets root
    augment: str  # training augmentation of the authors for this dataset
    epochs: int  # epochs when training on it


def datasets() -> tuple[DatasetSpec, DatasetSpec]:
    """MVTec-trained heads are tested on VisA at epoch 11, VisA-trained on MVTec at epoch 5
    (REFERENCE.md: the tested epochs are the intended ones)."""
    return (DatasetSpec(_env("MVTEC_NAME", "mvtec"), _env("MVTEC_ROOT", str(REPO / "data/mvtec")), "MVTEC_ROOT",
                        "mosaic", _env_int("FDSL_EPOCHS_MVTEC", "11")),
            DatasetSpec(_env("VISA_NAME", "visa"), _env("VISA_ROOT", str(REPO / "data/visa")), "VISA_ROOT",
                        "crop", _env_int("FDSL_EPOCHS_VISA", "5")))


def model_config(launch: Launch) -> ModelConfig:
    return ModelConfig(backbone=_env("FDSL_BACKBONE", ModelConfig.backbone), pretrained=_env("FDSL_PRETRAINED"),
                       image_size=_env_int("FDSL_IMAGE_SIZE"), use_nam=launch.use_nam)


def checkpoint_dir(launch: Launch, train_set: DatasetSpec) -> Path:
    results = Path(_env("RESULTS_ROOT", str(REPO / "results")))
    return results / launch.model_name / "checkpoints" / f"train_{train_set.name}_nam{int(launch.use_nam)}" / f"seed{launch.seed}"


def train_config(launch: Launch, train_set: DatasetSpec) -> TrainConfig:
    return TrainConfig(data_root=train_set.root, dataset=train_set.name, out_dir=str(checkpoint_dir(launch, train_set)),
                       model=model_config(launch), seed=launch.seed, epochs=train_set.epochs,
                       batch_size=_env_int("FDSL_BATCH_SIZE", "8"), train_k_shot=_env_int("FDSL_TRAIN_K_SHOT", "10"),
                       augment=train_set.augment, device=launch.device, workers=_env_int("FDSL_WORKERS", "0"),
                       max_steps=_env_int("FDSL_MAX_STEPS"))


def test_config(launch: Launch, train_set: DatasetSpec, test_set: DatasetSpec) -> TestConfig:
    ckpt = checkpoint_dir(launch, train_set) / f"epoch_{train_set.epochs}.pth"
    return TestConfig(data_root=test_set.root, dataset=test_set.name, checkpoint=str(ckpt),
                      results_root=_env("RESULTS_ROOT", str(REPO / "results")), model_name=launch.model_name, seed=launch.seed,
                      k_shot=launch.k_shot, winmode=launch.winmode, win_size=launch.win_size,
                      win_stride=launch.win_stride, win_weight=launch.win_weight,
                      image_index=_env("FDSL_IMAGE_INDEX", "windows"), eval_size=_env_int("FDSL_EVAL_SIZE", "240"),
                      batch_size=_env_int("FDSL_BATCH_SIZE", "8"), device=launch.device,
                      # None: what the checkpoint was trained with (e.g. weights at another path here)
                      backbone=_env("FDSL_BACKBONE"), pretrained=_env("FDSL_PRETRAINED"),
                      image_size=_env_int("FDSL_IMAGE_SIZE"))


def _script(name: str):
    """Import train.py / test.py by path: a bare `import test` could find the standard library's
    `test` package instead."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"fdsl_{name}_script", REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_before_training(launch: Launch, plans) -> None:
    """Arguments that only the test step uses are checked before hours of training: k against
    every test category, and the windows against the backbone's patch grid."""
    from data.dataset import load_meta, select_k_shot

    for _, test_set in plans:
        meta = load_meta(test_set.root)
        for cls in meta["test"]:
            select_k_shot(meta, cls, launch.k_shot, launch.seed)
    if launch.winmode != "nan":
        from models.backbones import create_backbone
        from models.lfe import WindowLayout

        cfg = model_config(launch)
        backbone = create_backbone(cfg.backbone, "cpu", "none", cfg.image_size)  # architecture only
        grid = backbone.image_size // backbone.patch_size
        WindowLayout.make((grid, grid), launch.win_size, launch.win_stride)


def run(mode: str, args: list[str]) -> None:
    from utils.config import resolve_device, validate_test

    train_script, test_script = _script("train"), _script("test")

    launch = parse_positional(args)
    resolve_device(launch.device)  # fail before any work on a machine without the GPU
    mvtec, visa = datasets()
    plans = [(mvtec, visa), (visa, mvtec)]  # (train on, test on)
    for train_set, test_set in plans:
        validate_test(test_config(launch, train_set, test_set))
        for spec in (train_set, test_set):
            if not Path(spec.root).is_dir():
                raise FileNotFoundError(f"{spec.name} dataset root not found: {spec.root} (set {spec.root_env} "
                                        f"to the folder that holds meta.json)")
    check_before_training(launch, plans)
    if mode == "train_and_test":
        for train_set, _ in plans:
            train_script.train(train_config(launch, train_set))
    for train_set, test_set in plans:
        test_script.evaluate(test_config(launch, train_set, test_set))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("train_and_test", "test"):
        print(f"launch.py: error: first argument must be train_and_test or test\n{USAGE}", file=sys.stderr)
        return 2
    return run_cli("launch.py", lambda: run(argv[0], argv[1:]))

if __name__ == "__main__":
    sys.exit(main())
