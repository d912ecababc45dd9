"""Bad input, round two (issue 21): runs that stopped with a traceback or a misleading message now stop with
one line naming the file, value or variable, and leave nothing half-written: a full disk while saving a
checkpoint, an empty test split, an --out that cannot be written, Ctrl-C and SIGTERM, and every numeric
setting from the command line or an FSAD_* variable (checked before any work or folder).

Most cases call the entry points' main() in this process (exit code and stderr as a user sees them, no
exception escaping = no traceback); a real SIGINT and NPROC need a subprocess."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import launch
import predict
import train
from conftest import load_test_script
from methods.checkpoint import read_checkpoint
from utils.cli import run_cli
from utils.io import OutputError, atomic_torch_save, atomic_write_json, deferred_interrupt
from utils.lock import LOCK_NAME

REPO = Path(__file__).resolve().parents[1]


def error_line(rc: int, err: str, prog: str, code: int = 2) -> str:
    """The one line a refused command prints (progress bars may come first), and no traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip() and "it/s]" not in ln and "s/it]" not in ln]
    assert rc == code and "Traceback" not in err, err
    assert lines and lines[-1].startswith(f"{prog}: "), err
    assert sum(f"{prog}: " in ln for ln in lines) == 1, err
    return lines[-1]


def leftovers(folder: Path) -> list[str]:
    """Temporary files and locks a run must not leave behind."""
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name == LOCK_NAME)


def train_argv(aux: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-root", str(aux), "--dataset", "aux", "--out-dir", str(out), "--backbone", "tiny_clip",
            "--classes", "tiles", "--train-k-shot", "1", "--batch-size", "4", "--max-steps", "1", "--epochs", "2",
            *extra]


def knn_argv(target: Path, results: Path, *extra: str) -> list[str]:
    return ["--data-root", str(target), "--dataset", "target", "--results-root", str(results), "--model-name", "m",
            "--method", "knn", "--backbone", "tiny_clip", "--classes", "candle", "--eval-size", "32", *extra]


# --------------------------------------------------------------------------- #
# 1. a full disk while saving: one line; the earlier checkpoint intact; resume works
# --------------------------------------------------------------------------- #
def test_disk_full_while_saving_a_checkpoint(datasets, tmp_path, monkeypatch, capsys, caplog):
    out = tmp_path / "ckpt"
    real_save = torch.save
    lost = {}

    def full_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # half-way: the temporary file exists, then the disk is full
        if Path(f).name.startswith(".epoch_2.pth."):
            lost.update(obj)  # the heads epoch 2 would have stored: what the resumed run must reach again
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    line = error_line(train.main(train_argv(datasets[0], out)), capsys.readouterr().err, "train.py")
    assert line == (f"train.py: error: cannot write {out / 'epoch_2.pth'}: No space left on device; the previous "
                    f"version of the file, if any, is unchanged")
    assert sorted(p.name for p in out.iterdir()) == ["epoch_1.pth", "train_config.json", "train_log.txt"]
    assert leftovers(out) == [] and read_checkpoint(out / "epoch_1.pth")["epoch"] == 1
    assert (out / "train_log.txt").read_text().splitlines()[-1] == line.replace("train.py: ", "")

    monkeypatch.setattr(torch, "save", real_save)  # space again: the rerun resumes after epoch 1
    with caplog.at_level("INFO", logger="fsad.train"):
        assert train.main(train_argv(datasets[0], out)) == 0
    assert "resuming after epoch 1" in caplog.text
    resumed = read_checkpoint(out / "epoch_2.pth")
    assert resumed["epoch"] == lost["epoch"] == 2
    for k, v in lost["state"].items():
        torch.testing.assert_close(resumed["state"][k], v, msg=k)


def test_torch_writer_failure_is_named_like_a_full_disk(tmp_path, monkeypatch):
    """torch's zip writer reports a full disk as a RuntimeError without errno."""
    def writer_fails(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK half")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", writer_fails)
    (tmp_path / "epoch_1.pth").write_bytes(b"the earlier one")
    with pytest.raises(OutputError) as e:
        atomic_torch_save(tmp_path / "epoch_1.pth", {"x": 1})
    assert str(e.value).startswith(f"cannot write {tmp_path / 'epoch_1.pth'}: ") and "file write failed" in str(e.value)
    assert "\n" not in str(e.value) and leftovers(tmp_path) == []
    assert (tmp_path / "epoch_1.pth").read_bytes() == b"the earlier one"


def test_full_disk_on_any_atomic_write_names_the_file(tmp_path, monkeypatch):
    atomic_write_json(tmp_path / "metrics.json", {"old": 1})

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(OutputError, match=f"cannot write {tmp_path / 'metrics.json'}: No space left on device"):
        atomic_write_json(tmp_path / "metrics.json", {"new": 2})
    monkeypatch.undo()
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"old": 1} and leftovers(tmp_path) == []


# --------------------------------------------------------------------------- #
# 2. an empty test split names its category; --out checked before the references are fitted
# --------------------------------------------------------------------------- #
def write_meta(root: Path, test: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    train = {c: [{"img_path": f"{c}/r0.png", "mask_path": "", "cls_name": c, "specie_name": "good", "anomaly": 0}]
             for c in test}
    (root / "meta.json").write_text(json.dumps({"train": train, "test": test}))
    return root / "meta.json"


@pytest.mark.parametrize("entry", ["test.py", "train.py"])
def test_an_empty_test_split_is_named(tmp_path, entry, capsys):
    good = {"img_path": "b/x.png", "mask_path": "", "cls_name": "b", "specie_name": "good", "anomaly": 0}
    meta = write_meta(tmp_path / "data", {"a": [], "b": [good]})
    out = tmp_path / "out"
    if entry == "test.py":
        rc = load_test_script().main(["--data-root", str(tmp_path / "data"), "--method", "knn", "--backbone",
                                      "tiny_clip", "--results-root", str(out)])
    else:
        rc = train.main(["--data-root", str(tmp_path / "data"), "--out-dir", str(out), "--backbone", "tiny_clip"])
    line = error_line(rc, capsys.readouterr().err, entry)
    assert f"category 'a' has no test image in {meta}" in line and "--classes" in line
    assert not out.exists()


def test_a_dataset_without_categories_is_named(tmp_path, capsys):
    meta = write_meta(tmp_path / "data", {})
    rc = load_test_script().main(["--data-root", str(tmp_path / "data"), "--method", "knn", "--backbone", "tiny_clip",
                                  "--results-root", str(tmp_path / "out")])
    assert f"{meta} has no category in its test split" in error_line(rc, capsys.readouterr().err, "test.py")


def test_predict_checks_its_output_folder_before_any_model(datasets, tmp_path, monkeypatch, capsys):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the model was built before --out was checked")

    monkeypatch.setattr(predict, "build_method", must_not_run)
    (tmp_path / "file").write_text("a file, not a folder")
    out = tmp_path / "file" / "out"
    rc = predict.main(["--method", "knn", "--backbone", "tiny_clip", "--refs", str(datasets[1] / "candle/train/good"),
                       "--images", str(datasets[1] / "candle/test/good"), "--out", str(out)])
    line = error_line(rc, capsys.readouterr().err, "predict.py")
    assert line == f"predict.py: error: cannot write the output folder (--out) {out}: {tmp_path / 'file'} is a file, " \
                   f"not a folder"


# --------------------------------------------------------------------------- #
# 3. Ctrl-C and SIGTERM: one line, exit 130 / 143, no temporary file, no lock
# --------------------------------------------------------------------------- #
@pytest.fixture
def ctrl_c_raises():
    """SIGINT as in a terminal (Python's default handler), also when the tests run as a background job,
    where the shell has SIGINT ignored."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_deferred_interrupt_finishes_the_write_and_a_second_one_stops_at_once(ctrl_c_raises):
    before = signal.getsignal(signal.SIGINT)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("the write went on")
    assert done == ["the write went on"] and signal.getsignal(signal.SIGINT) is before
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            done.append("not reached")
    assert done == ["the write went on"] and signal.getsignal(signal.SIGINT) is before


def test_sigterm_is_one_line_and_cleans_up_like_ctrl_c(capsys):
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as a process starts
    cleaned = []

    def work():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            cleaned.append("not reached")
        finally:
            cleaned.append("finally ran")

    try:
        assert run_cli("x.py", work) == 143 and cleaned == ["finally ran"]
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert capsys.readouterr().err.strip() == "x.py: terminated (SIGTERM); no half-written or temporary file was " \
                                              "left behind"


def test_keyboard_interrupt_while_writing_results_leaves_nothing(datasets, tmp_path, monkeypatch, capsys):
    import utils.io

    real = utils.io._atomic

    def interrupted(path, write):
        def half_then_ctrl_c(tmp):
            write(tmp)
            if Path(path).name == "table.md":
                raise KeyboardInterrupt  # as if Ctrl-C came while the temporary file was complete but not renamed
        return real(path, half_then_ctrl_c)

    monkeypatch.setattr(utils.io, "_atomic", interrupted)
    results = tmp_path / "results"
    rc = load_test_script().main(knn_argv(datasets[1], results))
    line = error_line(rc, capsys.readouterr().err, "test.py", 130)
    assert line == "test.py: interrupted (Ctrl-C); no half-written or temporary file was left behind"
    run = results / "m" / "target" / "1shot" / "seed0"
    assert leftovers(results) == [] and sorted(p.name for p in run.iterdir()) == ["config.json", "log.txt"]
    assert (run / "log.txt").read_text().splitlines()[-1].endswith("error: interrupted (KeyboardInterrupt)")


SIGINT_DURING_TABLE = """
import os, runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if started from a background job
sys.path.insert(0, os.getcwd())
import utils.io
real = utils.io._atomic
def atomic(path, write):
    def ctrl_c_then_write(tmp):
        if tmp.name.startswith('.table.md.'):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C with the temporary file just created
        write(tmp)
    return real(path, ctrl_c_then_write)
utils.io._atomic = atomic
sys.argv = ['test.py', *sys.argv[1:]]
runpy.run_path('test.py', run_name='__main__')
"""


def test_ctrl_c_in_a_real_process_is_one_line_and_leaves_no_temporary_file(datasets, tmp_path):
    results = tmp_path / "results"
    res = subprocess.run([sys.executable, "-c", SIGINT_DURING_TABLE, *knn_argv(datasets[1], results)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    line = error_line(res.returncode, res.stderr, "test.py", 130)
    assert "interrupted (Ctrl-C)" in line
    run = results / "m" / "target" / "1shot" / "seed0"
    # the write under way was finished (table.md complete), nothing after it ran: the run is not complete
    assert leftovers(results) == [] and not (run / "metrics.json").exists()
    assert "| mean" in (run / "table.md").read_text()


# --------------------------------------------------------------------------- #
# 4. numeric settings: refused before any work or folder, naming the option or variable
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("option, value, expected", [
    ("--batch-size", "0", "--batch-size must be an integer >= 1, got 0"),
    ("--image-size", "-5", "--image-size must be an integer >= 1, got -5"),
    ("--epochs", "0", "--epochs must be an integer >= 1, got 0"),
    ("--lr", "nan", "--lr must be a finite number > 0, got nan"),
    ("--lr", "-0.1", "--lr must be a finite number > 0, got -0.1"),
    ("--train-k-shot", "0", "--train-k-shot must be an integer >= 1, got 0"),
    ("--max-steps", "0", "--max-steps must be an integer >= 1, got 0"),
    ("--workers", "-1", "--workers must be an integer >= 0, got -1"),
])
def test_train_numeric_options(datasets, tmp_path, capsys, option, value, expected):
    argv = train_argv(datasets[0], tmp_path / "ckpt")
    if option in argv:
        i = argv.index(option)
        del argv[i:i + 2]
    line = error_line(train.main(argv + [option, value]), capsys.readouterr().err, "train.py")
    assert line == f"train.py: error: {expected}"
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("option, value, expected", [
    ("--batch-size", "0", "--batch-size must be an integer >= 1, got 0"),
    ("--image-size", "-5", "--image-size must be an integer >= 1, got -5"),
    ("--k-shot", "0", "--k-shot must be an integer >= 1, got 0"),
    ("--win-size", "0", "--win-size must be an integer >= 1, got 0"),
    ("--win-stride", "-2", "--win-stride must be an integer >= 1, got -2"),
    ("--eval-size", "-1", "--eval-size (0 = the masks' own resolution) must be an integer >= 0, got -1"),
    ("--save-images", "-2", "--save-images (-1 = all images, 0 = off) must be an integer >= -1, got -2"),
    ("--fpr-limit", "0", "--fpr-limit must be a finite number in (0, 1], got 0.0"),
    ("--fpr-limit", "nan", "--fpr-limit must be a finite number in (0, 1], got nan"),
    ("--win-weight", "inf", "--win-weight must be a finite number in [0, 1], got inf"),
    ("--workers", "-1", "--workers must be an integer >= 0, got -1"),
])
def test_test_numeric_options(datasets, tmp_path, capsys, option, value, expected):
    argv = knn_argv(datasets[1], tmp_path / "results")
    if option in argv:
        i = argv.index(option)
        del argv[i:i + 2]
    line = error_line(load_test_script().main(argv + [option, value]), capsys.readouterr().err, "test.py")
    assert line == f"test.py: error: {expected}"
    assert not (tmp_path / "results").exists()


def test_predict_image_size(datasets, tmp_path, capsys):
    rc = predict.main(["--method", "knn", "--backbone", "tiny_clip", "--refs", str(datasets[1] / "candle/train/good"),
                       "--images", str(datasets[1] / "candle/test/good"), "--out", str(tmp_path / "o"),
                       "--image-size", "-5"])
    assert error_line(rc, capsys.readouterr().err, "predict.py") == \
        "predict.py: error: --image-size must be an integer >= 1, got -5"
    assert not (tmp_path / "o").exists()


LAUNCH = ["train_and_test", "m", "cpu", "1", "nan", "13", "2", "0.5", "0", "1"]


@pytest.mark.parametrize("env, args, expected", [
    ({"FSAD_BATCH_SIZE": "0"}, {}, "environment variable FSAD_BATCH_SIZE: expected an integer >= 1, got '0'"),
    ({"FDSL_BATCH_SIZE": "-4"}, {}, "environment variable FDSL_BATCH_SIZE: expected an integer >= 1, got '-4'"),
    ({"FSAD_IMAGE_SIZE": "-5"}, {}, "environment variable FSAD_IMAGE_SIZE: expected an integer >= 1, got '-5'"),
    ({"FSAD_EPOCHS_VISA": "0"}, {}, "environment variable FSAD_EPOCHS_VISA: expected an integer >= 1, got '0'"),
    ({"FSAD_TRAIN_K_SHOT": "0"}, {}, "environment variable FSAD_TRAIN_K_SHOT: expected an integer >= 1, got '0'"),
    ({"FSAD_WORKERS": "-1"}, {}, "environment variable FSAD_WORKERS: expected an integer >= 0, got '-1'"),
    ({"FSAD_MAX_STEPS": "0"}, {}, "environment variable FSAD_MAX_STEPS: expected an integer >= 1, got '0'"),
    ({"FSAD_SAVE_IMAGES": "-2"}, {}, "environment variable FSAD_SAVE_IMAGES: expected an integer >= -1, got '-2'"),
    ({"FSAD_EVAL_SIZE": "-1"}, {}, "environment variable FSAD_EVAL_SIZE: expected an integer >= 0, got '-1'"),
    ({"FSAD_TRAIN_SEED": "-3"}, {}, "environment variable FSAD_TRAIN_SEED: expected an integer >= 0 or 'same', "
                                    "got '-3'"),
    ({"FSAD_IMAGE_INDEX": "sometimes"}, {}, "environment variable FSAD_IMAGE_INDEX: expected one of off, windows, "
                                            "all, got 'sometimes'"),
    ({"FSAD_PRECISION": "fp64"}, {}, "environment variable FSAD_PRECISION: expected one of auto, fp32, bf16, fp16, "
                                     "got 'fp64'"),
    ({"FSAD_DIST_TIMEOUT": "1h"}, {}, "environment variable FSAD_DIST_TIMEOUT: expected a number of seconds > 0, "
                                      "got '1h'"),
    ({}, {5: "0"}, "argument win-size: expected an integer >= 1, got 0"),
    ({}, {6: "-1"}, "argument win-stride: expected an integer >= 1, got -1"),
    ({}, {7: "nan"}, "argument win-weight: expected a number in [0, 1], got 'nan'"),
])
def test_launcher_settings(tmp_path, monkeypatch, capsys, env, args, expected):
    monkeypatch.setenv("RESULTS_ROOT", str(tmp_path / "results"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    argv = [args.get(i, a) for i, a in enumerate(LAUNCH)]
    line = error_line(launch.main(argv), capsys.readouterr().err, "launch.py")
    assert line.startswith(f"launch.py: error: {expected}"), line
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("same", ["MVTEC_ROOT", "MVTEC_NAME"])
def test_launcher_refuses_one_dataset_for_both_directions(tmp_path, monkeypatch, capsys, same):
    """Training uses a dataset's test split: testing on the same folder would score the training images."""
    monkeypatch.setenv("RESULTS_ROOT", str(tmp_path / "results"))
    monkeypatch.setenv("VISA_ROOT", str(tmp_path))
    monkeypatch.setenv("MVTEC_ROOT", str(tmp_path) if same == "MVTEC_ROOT" else str(tmp_path / "other"))
    monkeypatch.setenv("VISA_NAME", "x")
    monkeypatch.setenv("MVTEC_NAME", "x" if same == "MVTEC_NAME" else "y")
    line = error_line(launch.main(LAUNCH), capsys.readouterr().err, "launch.py")
    other = "VISA_NAME" if same == "MVTEC_NAME" else "VISA_ROOT"
    assert f"environment variables {same} and {other} are " in line
    assert not (tmp_path / "results").exists()


def test_settings_are_checked_before_nproc_starts_processes(tmp_path):
    """End to end: with NPROC=2 a bad variable used to reach every process and end in torchrun's traceback."""
    env = {**os.environ, "NPROC": "2", "RESULTS_ROOT": str(tmp_path / "r"), "FSAD_DIST_TIMEOUT": "abc"}
    res = subprocess.run([sys.executable, "launch.py", *LAUNCH], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=env)
    assert error_line(res.returncode, res.stderr, "launch.py") == \
        "launch.py: error: environment variable FSAD_DIST_TIMEOUT: expected a number of seconds > 0, got 'abc'"
    assert "torch.distributed" not in res.stderr and not (tmp_path / "r").exists()


def test_a_global_batch_that_does_not_split_over_nproc_is_refused_first(monkeypatch):
    monkeypatch.setenv("NPROC", "2")
    monkeypatch.setenv("FSAD_BATCH_SIZE", "3")
    plan = launch.method_plan(launch.parse_positional(LAUNCH[1:]))
    with pytest.raises(ValueError, match=r"FSAD_BATCH_SIZE=3 is the global batch and must split evenly over "
                                         r"NPROC=2 processes; use a multiple of 2"):
        launch.check_environment("train_and_test", plan)
    launch.check_environment("test", plan)  # testing splits categories, not batches
    monkeypatch.setenv("FSAD_BATCH_SIZE", "4")
    launch.check_environment("train_and_test", plan)
