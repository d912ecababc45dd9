"""The cross-dataset protocol behind trainAndTest.sh and test_few_shot.sh.

    python launch.py {train_and_test|test|where} model_name device useNAM winmode win-size win-stride win-weight seed kshots

`where` prints, per half, the train and test dataset, the checkpoint ('-': none) and the results
folder, tab-separated, without running anything.

Train on MVTec AD -> test on VisA; train on VisA -> test on MVTec AD. The method (METHOD=fdsl,
dcpsfr, knn, anomalydino or subspacead), paths, backbone and schedule come from environment variables (README,
"Launchers"), so the nine positional arguments stay those of the authors' scripts. A
training-free method (knn, anomalydino, subspacead) skips training and is tested on both datasets.

Folders: the heads go to results/<model_name>/checkpoints/train_<dataset>_<method tag>[_<precision>]/
seed<train seed>/, shared by every test configuration of those heads; results go to
results/<model_name>_<settings tag>/<dataset>/<k>shot/seed<seed>/, where the tag names every test
setting that changes numbers (e.g. fdsl_nam1_mul-w13s2x0.5-idxwin). The seed argument chooses the
test references; the heads are trained with FSAD_TRAIN_SEED (111, the authors' fixed seed), so one
checkpoint serves every test seed.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from utils import distributed, report
from utils.cli import run_cli
from utils.config import WINMODES, MethodConfig, TestConfig, TrainConfig, effective_test_settings, to_dict

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
    for what, value in (("win-size", launch.win_size), ("win-stride", launch.win_stride)):
        if value < 1:
            raise ValueError(f"argument {what}: expected an integer >= 1, got {value}")
    if not 0.0 <= launch.win_weight <= 1.0:  # also refuses nan
        raise ValueError(f"argument win-weight: expected a number in [0, 1], got '{weight}'")
    if launch.seed < 0:
        raise ValueError(f"argument seed: expected >= 0, got {launch.seed}")
    return launch


# Settings that serve every method are FSAD_<NAME>; the FDSL_<NAME> spelling of earlier
# versions is still read (FSAD_ wins when both are set).
PREFIXES = ("FSAD_", "FDSL_")


def _env(name: str, default: str | None = None) -> str | None:
    """`name` as given (MVTEC_ROOT, METHOD, ...) or, for a bare setting name such as 'BACKBONE',
    FSAD_BACKBONE then its alias FDSL_BACKBONE."""
    for key in _keys(name):
        value = os.environ.get(key, "").strip()
        if value:
            return value
    return default


UNPREFIXED = ("METHOD", "ABLATION", "MVTEC_ROOT", "VISA_ROOT", "MVTEC_NAME", "VISA_NAME", "RESULTS_ROOT")


def _keys(name: str) -> list[str]:
    return [name] if name in UNPREFIXED else [p + name for p in PREFIXES]


# Integer settings and their smallest value (SAVE_IMAGES: -1 = all images; EVAL_SIZE: 0 = the masks' size).
ENV_INTS = {"IMAGE_SIZE": 1, "EPOCHS_MVTEC": 1, "EPOCHS_VISA": 1, "TRAIN_K_SHOT": 1, "BATCH_SIZE": 1, "WORKERS": 0,
            "MAX_STEPS": 1, "SAVE_IMAGES": -1, "EVAL_SIZE": 0}


def _env_key(name: str) -> str:
    """The variable that set `name` (FSAD_X, or its alias FDSL_X), for messages."""
    return next((k for k in _keys(name) if os.environ.get(k, "").strip()), _keys(name)[0])


def _env_int(name: str, default: str | int | None = None) -> int | None:
    value = _env(name, None if default is None else str(default))
    if value is None:
        return None
    minimum = ENV_INTS.get(name)
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or (minimum is not None and number < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"environment variable {_env_key(name)}: expected an integer{bound}, got '{value}'") from None
    return number


REPO = Path(__file__).resolve().parent


@dataclass
class DatasetSpec:
    name: str  # results folder name
    key: str  # mvtec | visa: picks the method's epochs for training on it
    root: str
    root_env: str  # the variable that sets root
    augment: str  # training augmentation of the authors for this dataset


def datasets() -> tuple[DatasetSpec, DatasetSpec]:
    return (DatasetSpec(_env("MVTEC_NAME", "mvtec"), "mvtec", _env("MVTEC_ROOT", str(REPO / "data/mvtec")),
                        "MVTEC_ROOT", "mosaic"),
            DatasetSpec(_env("VISA_NAME", "visa"), "visa", _env("VISA_ROOT", str(REPO / "data/visa")),
                        "VISA_ROOT", "crop"))


@dataclass
class MethodPlan:
    """The method a launch runs: its request, resolved config and where its files go."""
    request: MethodConfig
    config: dict
    cls: type
    folder: str  # results/<folder>: model_name, plus the ablation when one is asked


def method_plan(launch: Launch) -> MethodPlan:
    from methods import METHODS, resolve_method_config

    name = _env("METHOD", "fdsl")
    if name not in METHODS:
        raise ValueError(f"environment variable METHOD: expected one of {', '.join(sorted(METHODS))}, got '{name}'")
    cls = METHODS[name]
    params = {"use_nam": launch.use_nam} if name == "fdsl" else {}  # useNAM is FDSL's switch
    folder = launch.model_name
    ablation = _env("ABLATION", "none")
    if ablation != "none":
        if ablation not in cls.ablations:
            raise ValueError(f"environment variable ABLATION: method '{name}' has "
                             f"{', '.join(['none', *cls.ablations]) if cls.ablations else 'no ablations'}, got '{ablation}'")
        params.update(cls.ablations[ablation])
        folder = f"{launch.model_name}-{ablation}"
    request = MethodConfig(name=name, backbone=_env("BACKBONE"), pretrained=_env("PRETRAINED"),
                           image_size=_env_int("IMAGE_SIZE"), params=params)
    return MethodPlan(request, resolve_method_config(request), cls, folder)


def results_root() -> Path:
    return Path(_env("RESULTS_ROOT", str(REPO / "results")))


def epochs(plan: MethodPlan, train_set: DatasetSpec) -> int:
    """FSAD_EPOCHS_MVTEC / _VISA, else the method config's (FDSL: MVTec-trained heads are tested on
    VisA at epoch 11, VisA-trained on MVTec at epoch 5; REFERENCE.md: the tested epochs)."""
    default = plan.config.get("training", {}).get("epochs", {}).get(train_set.key, 5)
    return _env_int(f"EPOCHS_{train_set.key.upper()}", default)


AUTHORS_TRAIN_SEED = 111  # the authors' train.py seeds every run with it; their seed argument only reached test.py


def train_seed_setting() -> str:
    """FSAD_TRAIN_SEED as given: an integer, or 'same' (train with the launcher's seed argument, one
    set of heads per test seed)."""
    value = _env("TRAIN_SEED", str(AUTHORS_TRAIN_SEED)).lower()
    if value != "same":
        try:
            number = int(value)
        except ValueError:
            number = -1
        if number < 0:
            raise ValueError(f"environment variable {_env_key('TRAIN_SEED')}: expected an integer >= 0 or 'same', "
                             f"got '{value}'") from None
        value = str(number)
    return value


def train_seed(launch: Launch) -> int:
    value = train_seed_setting()
    return launch.seed if value == "same" else int(value)


def precision(launch: Launch) -> str:
    """FSAD_PRECISION made concrete for this process's device ('auto' -> bf16 on a recent GPU,
    fp32 on CPU): folders are named after what runs, not after 'auto'."""
    value = _env("PRECISION", "auto")
    if value.lower() == "fp32":
        return "fp32"  # needs no device (folder names can be computed anywhere)
    distributed.rank_device(launch.device)  # device errors first: they name the device, not FSAD_PRECISION
    try:
        return distributed.run_precision(value, launch.device)
    except ValueError as e:
        key = next((k for k in _keys("PRECISION") if os.environ.get(k, "").strip()), "FSAD_PRECISION")
        raise ValueError(f"environment variable {key}: {e}") from None


def precision_tag(launch: Launch, value: str | None = None) -> list[str]:
    """Reduced precision changes the numbers a little: it is named (e.g. _bf16); fp32 is not.
    `value`: that precision instead of the launch's."""
    p = precision(launch) if value is None else value
    return [] if p == "fp32" else [p]


def checkpoint_dir(launch: Launch, plan: MethodPlan, train_set: DatasetSpec, at_precision: str | None = None) -> Path:
    """The heads' folder; `at_precision`: that of heads trained at another precision (default: the launch's)."""
    tag = "_".join([plan.cls.checkpoint_tag(plan.config), *precision_tag(launch, at_precision)])
    return (results_root() / plan.folder / "checkpoints" / f"train_{train_set.name}_{tag}"
            / f"seed{train_seed(launch)}")


DEFAULT_EVAL_SIZE = 240  # the authors' metric resolution
_INDEX_TAG = {"off": "off", "windows": "win", "all": "all"}


def test_settings(launch: Launch) -> dict:
    """The test settings that change numbers besides the heads, as TestConfig fields."""
    return {"winmode": launch.winmode, "win_size": launch.win_size, "win_stride": launch.win_stride,
            "win_weight": launch.win_weight, "image_index": _env("IMAGE_INDEX", "windows"),
            "eval_size": _env_int("EVAL_SIZE", DEFAULT_EVAL_SIZE)}


def settings_tag(launch: Launch, plan: MethodPlan) -> str:
    """Names the results of one test configuration: the heads' tag (fdsl: nam0/nam1), the windows
    and the index as they are used (`nan` ignores window settings), and the evaluation size and
    training seed when not the defaults, and the precision when not fp32. One model_name then holds several configurations."""
    s = effective_test_settings(test_settings(launch))
    parts = []
    if plan.cls.checkpoint_tag(plan.config) != plan.cls.name:
        parts.append(plan.cls.checkpoint_tag(plan.config))
    win = s["winmode"]
    if win != "nan":
        win += f"-w{s['win_size']}s{s['win_stride']}"
        if s["win_weight"] is not None:
            win += f"x{s['win_weight']:g}"
    if win != "nan" or s["image_index"] == "all":
        win += f"-idx{_INDEX_TAG[s['image_index']]}"
    parts.append(win)
    if s["eval_size"] != DEFAULT_EVAL_SIZE:
        parts.append(f"eval{s['eval_size']}" if s["eval_size"] else "evalfull")
    seed = train_seed_setting()
    if plan.cls.trainable and seed != str(AUTHORS_TRAIN_SEED):
        parts.append(f"trainseed{'-same' if seed == 'same' else seed}")
    return "_".join(parts + precision_tag(launch))


def results_folder(launch: Launch, plan: MethodPlan) -> str:
    """results/<this>/<dataset>/<k>shot/seed<s>: one level, as utils.report.scan_runs expects."""
    return f"{plan.folder}_{settings_tag(launch, plan)}"


AUGMENT_CHOICES = ("authors", "mosaic", "crop", "none")


def train_references(plan: MethodPlan, train_set: DatasetSpec) -> tuple[int, str]:
    """Training references per category and augmentation: FSAD_TRAIN_K_SHOT / FSAD_AUGMENT, else
    the method config's training.train_k_shot / training.augment, else 10 and the authors'
    augmentation of the dataset (mosaic for MVTec, crop for VisA). `authors` = the dataset's."""
    from methods import training_references

    k, augment = training_references(plan.config, train_set.augment)
    augment = _env("AUGMENT", augment).lower()
    if augment not in AUGMENT_CHOICES:
        raise ValueError(f"environment variable {_env_key('AUGMENT')}: expected one of "
                         f"{', '.join(AUGMENT_CHOICES)}, got '{augment}'")
    return _env_int("TRAIN_K_SHOT", k), train_set.augment if augment == "authors" else augment


def train_config(launch: Launch, plan: MethodPlan, train_set: DatasetSpec) -> TrainConfig:
    k, augment = train_references(plan, train_set)
    return TrainConfig(data_root=train_set.root, dataset=train_set.name,
                       out_dir=str(checkpoint_dir(launch, plan, train_set)), method=plan.request,
                       seed=train_seed(launch),
                       epochs=epochs(plan, train_set), batch_size=_env_int("BATCH_SIZE", 8),
                       train_k_shot=k, augment=augment, device=launch.device,
                       workers=_env_int("WORKERS", 0), max_steps=_env_int("MAX_STEPS"),
                       precision=precision(launch))


def test_config(launch: Launch, plan: MethodPlan, train_set: DatasetSpec, test_set: DatasetSpec) -> TestConfig:
    trained = plan.cls.trainable
    ckpt = checkpoint_dir(launch, plan, train_set) / f"epoch_{epochs(plan, train_set)}.pth" if trained else ""
    return TestConfig(data_root=test_set.root, dataset=test_set.name, checkpoint=str(ckpt), method=plan.request.name,
                      results_root=str(results_root()), model_name=results_folder(launch, plan), seed=launch.seed,
                      k_shot=launch.k_shot, **test_settings(launch),
                      batch_size=_env_int("BATCH_SIZE", 8), device=launch.device,
                      save_images=_env_int("SAVE_IMAGES", 0),
                      precision=precision(launch), workers=_env_int("WORKERS", 0),
                      # trained: None = what the checkpoint was trained with (e.g. weights at another path
                      # here); training-free: the method config's unless set
                      backbone=_env("BACKBONE"), pretrained=_env("PRETRAINED"), image_size=_env_int("IMAGE_SIZE"),
                      # a training-free method's parameters (ABLATION) reach the test; trained ones are in the checkpoint
                      params={} if trained else dict(plan.request.params))


def _script(name: str):
    """Import train.py / test.py by path: a bare `import test` could find the standard library's
    `test` package instead."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"fsad_{name}_script", REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_before_training(launch: Launch, plan: MethodPlan, plans) -> None:
    """Arguments that only the test step uses are checked before hours of training: k against
    every test category, and the windows against the backbone's patch grid."""
    from data.dataset import load_meta, select_k_shot

    for _, test_set in plans:
        meta = load_meta(test_set.root)
        for cls in meta["test"]:
            select_k_shot(meta, cls, launch.k_shot, launch.seed)
    if launch.winmode != "nan":
        from methods import create_method
        from methods.base import InferenceOptions

        # architecture only (random weights): configure() refuses windows that do not fit the grid,
        # or a method without windows
        arch = {**plan.config, "backbones": {r: {**b, "pretrained": "none"} for r, b in plan.config["backbones"].items()}}
        create_method(arch).configure(InferenceOptions(winmode=launch.winmode, win_size=launch.win_size,
                                                       win_stride=launch.win_stride))


def check_trained(launch: Launch, plan: MethodPlan, plans) -> None:
    """test mode: heads missing here but trained at another precision (another `_bf16` folder) are
    named, with the setting that tests them, instead of a bare "checkpoint not found"."""
    for train_set, test_set in plans:
        ckpt = Path(test_config(launch, plan, train_set, test_set).checkpoint)
        if ckpt.is_file():
            continue
        for other in ("fp32", "bf16", "fp16"):
            found = checkpoint_dir(launch, plan, train_set, other) / ckpt.name
            if found != ckpt and found.is_file():
                raise FileNotFoundError(f"checkpoint not found: {ckpt}; {found} holds heads trained with precision "
                                        f"{other}: set FSAD_PRECISION={other} to test them (or train these with "
                                        f"trainAndTest.sh)")


def check_folders(mode: str, launch: Launch, plan: MethodPlan, plans, train_script, test_script) -> None:
    """Conflicts with what is on disk, before any training: a checkpoint folder trained with other
    settings (train.py's check_same_run), and a results folder of this settings tag holding another
    configuration, compared with what the checkpoint will record once trained (test.py's check)."""
    for train_set, test_set in plans:
        training = None
        if plan.cls.trainable:
            cfg, method_cfg = train_script.resolve_training(train_config(launch, plan, train_set))
            done, last, ckpt = train_script.last_good_checkpoint(Path(cfg.out_dir))
            if done:
                train_script.check_same_run(last, cfg, method_cfg["method"], ckpt)
            if mode == "train_and_test" and done < cfg.epochs:
                training = (to_dict(cfg), cfg.epochs)  # train.py stores exactly this in the checkpoint
        test_script.check_results_folder(test_config(launch, plan, train_set, test_set), training)


def check_environment(mode: str, plan: MethodPlan) -> None:
    """Every setting from the environment, read once before any work and before NPROC starts processes
    (where a bad value would stop every process, each with a torchrun traceback): the message names the
    variable."""
    for name in ENV_INTS:
        _env_int(name)
    train_seed_setting()
    index = _env("IMAGE_INDEX", "windows")
    if index not in _INDEX_TAG:
        raise ValueError(f"environment variable {_env_key('IMAGE_INDEX')}: expected one of "
                         f"{', '.join(_INDEX_TAG)}, got '{index}'")
    from models.backbones import PRECISIONS

    value = _env("PRECISION", "auto")
    if value.lower() not in PRECISIONS:
        raise ValueError(f"environment variable {_env_key('PRECISION')}: expected one of {', '.join(PRECISIONS)}, "
                         f"got '{value}'")
    distributed.dist_timeout()
    mvtec, visa = datasets()
    if mvtec.name == visa.name:  # both directions would write into one results and one checkpoint folder
        raise ValueError(f"environment variables MVTEC_NAME and VISA_NAME are both '{mvtec.name}'; the two "
                         f"datasets need different names")
    if os.path.realpath(mvtec.root) == os.path.realpath(visa.root):
        raise ValueError(f"environment variables MVTEC_ROOT and VISA_ROOT are the same folder {mvtec.root}: the "
                         f"protocol trains on one dataset and tests on the other, so the heads would be tested on "
                         f"their own training images; evaluate one dataset with test.py")
    n = distributed.nproc_from_env()
    batch = _env_int("BATCH_SIZE", 8)
    if n > 1 and mode == "train_and_test" and plan.cls.trainable and batch % n:
        raise ValueError(f"environment variable {_env_key('BATCH_SIZE')}={batch} is the global batch and must split "
                         f"evenly over NPROC={n} processes; use a multiple of {n}")


def run(mode: str, args: list[str]) -> None:
    from utils.config import resolve_device, validate_test

    train_script, test_script = _script("train"), _script("test")

    launch = parse_positional(args)
    plan = method_plan(launch)
    check_environment(mode, plan)
    # NPROC=N: this whole launch again under torchrun, N processes (DDP training, sharded tests)
    distributed.relaunch_under_torchrun(__file__, [mode, *args], launch.device)
    resolve_device(launch.device)  # fail before any work on a machine without the GPU
    mvtec, visa = datasets()
    plans = [(mvtec, visa), (visa, mvtec)]  # (train on, test on)
    for train_set, test_set in plans:
        validate_test(test_config(launch, plan, train_set, test_set))
        for spec in (train_set, test_set):
            if not Path(spec.root).is_dir():
                raise FileNotFoundError(f"{spec.name} dataset root not found: {spec.root} (set {spec.root_env} "
                                        f"to the folder that holds meta.json)")
        if mode == "train_and_test" and plan.cls.trainable:  # output folders: writable before any work
            train_script.check_output(train_config(launch, plan, train_set))
        test_script.check_output(test_config(launch, plan, train_set, test_set))
    check_before_training(launch, plan, plans)
    if mode == "test" and plan.cls.trainable:
        check_trained(launch, plan, plans)
    check_folders(mode, launch, plan, plans, train_script, test_script)
    if mode == "train_and_test" and plan.cls.trainable:
        for train_set, _ in plans:
            train_script.train(train_config(launch, plan, train_set))
    for train_set, test_set in plans:
        test_script.evaluate(test_config(launch, plan, train_set, test_set))


def where(args: list[str]) -> list[tuple[str, str, str, str]]:
    """(train set, test set, checkpoint or '-', results folder) of each half of a launch, as the
    other modes compute them, after the same checks of the environment; nothing is run or checked on
    disk (demo.sh finds its run with it)."""
    launch = parse_positional(args)
    plan = method_plan(launch)
    check_environment("where", plan)
    mvtec, visa = datasets()
    out = []
    for train_set, test_set in ((mvtec, visa), (visa, mvtec)):
        cfg = test_config(launch, plan, train_set, test_set)
        run_dir = report.run_dir(cfg.results_root, cfg.model_name, cfg.dataset, cfg.k_shot, cfg.seed)
        out.append((train_set.name, test_set.name, cfg.checkpoint or "-", str(run_dir)))
    return out


MODES = ("train_and_test", "test", "where")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in MODES:
        print(f"launch.py: error: first argument must be one of {', '.join(MODES)}\n{USAGE}", file=sys.stderr)
        return 2
    if argv[0] == "where":
        return run_cli("launch.py", lambda: print("\n".join("\t".join(row) for row in where(argv[1:]))))
    return run_cli("launch.py", lambda: run(argv[0], argv[1:]))

if __name__ == "__main__":
    sys.exit(main())
