"""Bad input around runs (the run-side half of the issue; tests/test_bad_input.py has the data side):
concurrent runs, negative seeds, damaged or unsafe checkpoints, folders that cannot be written, the
refusal hint, the run log, --help, and errors from DataLoader workers.

Each command-line case checks the exit code, that the message names the file or value, that stderr
has no traceback, and that no results file was written or lost. Tiny backbone, a few images."""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from conftest import load_test_script
from methods.checkpoint import CheckpointError, DamagedCheckpointError, read_checkpoint
from utils.cli import run_cli, user_error
from utils.config import MethodConfig, TrainConfig
from utils.io import OutputError, check_writable
from utils.lock import LOCK_NAME, RunLock, RunLockedError

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=180,
                         env={**os.environ, **(env or {})})
    assert "Traceback" not in res.stderr, res.stderr
    return res


def error_line(res: subprocess.CompletedProcess, prog: str) -> str:
    """The one error line of a refused command (progress bars may come before it)."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and lines and lines[-1].startswith(f"{prog}: error: "), res.stderr
    assert sum("error:" in ln for ln in lines) == 1, res.stderr
    return lines[-1]


def files(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes: compared before and after a refused command."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} \
        if root.exists() else {}


def knn_test_args(target: Path, results: Path, *extra: str) -> list[str]:
    """test.py with the training-free knn method: no checkpoint needed, one category, small metrics."""
    return ["test.py", "--data-root", str(target), "--dataset", "target", "--results-root", str(results),
            "--model-name", "m", "--method", "knn", "--backbone", "tiny_clip", "--classes", "candle",
            "--eval-size", "32", *extra]


def train_args(aux: Path, out: Path, *extra: str) -> list[str]:
    return ["train.py", "--data-root", str(aux), "--dataset", "aux", "--out-dir", str(out), "--backbone",
            "tiny_clip", "--classes", "tiles", "--train-k-shot", "1", "--batch-size", "4", "--max-steps", "1",
            "--epochs", "2", *extra]


def run_folder(results: Path, seed: int = 0) -> Path:
    return results / "m" / "target" / "1shot" / f"seed{seed}"


def write_lock(folder: Path, pid: int) -> Path:
    """A lock file as a live run writes it (utils/lock.py), for the process `pid` on this host."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2024-01-01 00:00:00",
                                "command": "test.py ..."}))
    return path


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def ckpt_dir(datasets, tmp_path_factory) -> Path:
    """Two epochs of one step each on one category: the settings of train_args()."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train.train(TrainConfig(data_root=str(datasets[0]), dataset="aux", out_dir=str(out), classes=["tiles"],
                            method=MethodConfig(backbone="tiny_clip"), epochs=2, batch_size=4, train_k_shot=1,
                            max_steps=1))
    return out


@pytest.fixture(scope="module")
def finished(datasets, tmp_path_factory):
    """A finished knn run, started over a stale lock (its holder's pid is dead): (results, process, dead pid)."""
    results = tmp_path_factory.mktemp("results")
    pid = dead_pid()
    write_lock(run_folder(results), pid)
    return results, run(*knn_test_args(datasets[1], results)), pid


# --------------------------------------------------------------------------- #
# 1. one run per folder: lock files
# --------------------------------------------------------------------------- #
def test_results_folder_held_by_a_live_process_is_refused(datasets, tmp_path):
    holder = subprocess.Popen(["sleep", "60"])
    try:
        lock = write_lock(run_folder(tmp_path), holder.pid)
        before = files(tmp_path)
        line = error_line(run(*knn_test_args(datasets[1], tmp_path)), "test.py")
    finally:
        holder.kill()
        holder.wait()
    assert str(run_folder(tmp_path)) in line and f"pid {holder.pid} on host {socket.gethostname()}" in line
    assert "in use by another run" in line and str(lock) in line  # the file to delete if that run is gone
    assert files(tmp_path) == before  # nothing written, the holder's lock untouched


def test_checkpoint_folder_held_by_a_running_training_is_refused(datasets, tmp_path):
    out = tmp_path / "ckpt"
    with RunLock(out, "checkpoint folder"):  # this process holds it, as train.train does
        before = files(out)
        line = error_line(run(*train_args(datasets[0], out)), "train.py")
        assert files(out) == before
    assert str(out) in line and f"pid {os.getpid()}" in line and "another out-dir" in line
    assert not out.exists()  # released, and the folder the lock created is gone again


def test_stale_lock_of_a_dead_process_is_taken_over(finished):
    results, res, pid = finished
    assert res.returncode == 0, res.stderr
    assert f"taking over the lock of {run_folder(results)}" in res.stderr and f"pid {pid} " in res.stderr
    assert (run_folder(results) / "metrics.json").is_file()
    assert not (run_folder(results) / LOCK_NAME).exists()  # released at the end


def test_lock_is_released_on_exceptions_and_refuses_a_second_holder(tmp_path):
    folder = tmp_path / "a" / "b"
    with pytest.raises(ZeroDivisionError):
        with RunLock(folder):
            assert (folder / LOCK_NAME).is_file()
            with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
                RunLock(folder).acquire()
            1 / 0
    assert not (tmp_path / "a").exists()  # nothing left: no lock file, no empty folders
    with RunLock(folder):
        (folder / "kept.txt").write_text("x")
    assert os.listdir(folder) == ["kept.txt"]


# --------------------------------------------------------------------------- #
# 2. negative seeds are refused before anything is written
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("entry", ["train.py", "test.py", "launch.py"])
def test_negative_seed_is_refused_everywhere(datasets, tmp_path, entry):
    if entry == "train.py":
        res = run(*train_args(datasets[0], tmp_path / "ckpt", "--seed", "-1"))
    elif entry == "test.py":
        res = run(*knn_test_args(datasets[1], tmp_path, "--seed", "-1"))
    else:
        res = run("launch.py", "test", "m", "cpu", "1", "nan", "13", "2", "0.5", "-1", "1",
                  env={"RESULTS_ROOT": str(tmp_path)})
    line = error_line(res, entry)
    assert "seed" in line and "-1" in line and ">= 0" in line
    assert files(tmp_path) == {} and not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- #
# 3. damaged checkpoints: one line; training falls back to the last good epoch
# --------------------------------------------------------------------------- #
def damage(path: Path, kind: str) -> Path:
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"not a checkpoint" * 20}[kind])
    return path


@pytest.mark.parametrize("kind, needle", [("empty", "the file is empty"),
                                          ("truncated", "damaged, truncated or not a torch checkpoint")])
def test_damaged_checkpoint_is_named_in_one_line(datasets, ckpt_dir, tmp_path, kind, needle):
    bad = tmp_path / "epoch_2.pth"
    shutil.copy(ckpt_dir / "epoch_2.pth", bad)
    damage(bad, kind)
    args = knn_test_args(datasets[1], tmp_path / "results", "--checkpoint", str(bad))
    args.remove("knn")
    args.remove("--method")
    line = error_line(run(*args), "test.py")
    assert f"cannot read checkpoint {bad}" in line and needle in line
    assert not (tmp_path / "results").exists()


def test_unreadable_checkpoint_variants_raise_one_line(ckpt_dir, tmp_path):
    bad = damage(shutil.copy(ckpt_dir / "epoch_1.pth", tmp_path / "x.pth"), "garbage")
    with pytest.raises(DamagedCheckpointError) as e:
        read_checkpoint(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_training_resumes_from_the_last_good_epoch(datasets, ckpt_dir, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(ckpt_dir, out)
    reference = read_checkpoint(out / "epoch_2.pth")["state"]
    damage(out / "epoch_2.pth", "truncated")
    res = run(*train_args(datasets[0], out))
    assert res.returncode == 0, res.stderr
    said = f"cannot read checkpoint {out / 'epoch_2.pth'}"
    assert said in res.stderr and "falling back to epoch_1.pth" in res.stderr
    assert "resuming after epoch 1" in res.stderr
    assert any(ln.startswith(f"warning: {said}") for ln in (out / "train_log.txt").read_text().splitlines())
    redone = read_checkpoint(out / "epoch_2.pth")  # epoch 2 trained again from epoch 1: the same heads
    assert redone["epoch"] == 2
    for k, v in reference.items():
        torch.testing.assert_close(redone["state"][k], v, msg=k)
    assert not (out / LOCK_NAME).exists()


def test_no_readable_epoch_means_starting_over(ckpt_dir, tmp_path, caplog):
    out = tmp_path / "ckpt"
    shutil.copytree(ckpt_dir, out)
    damage(out / "epoch_1.pth", "empty")
    damage(out / "epoch_2.pth", "garbage")
    with caplog.at_level(logging.WARNING, logger="fsad.train"):
        assert train.last_good_checkpoint(out) == (0, None, None)
    assert "falling back to epoch_1.pth" in caplog.text and "training starts over" in caplog.text


# --------------------------------------------------------------------------- #
# 4. pickled code in a checkpoint: refused, without suggesting weights_only=False
# --------------------------------------------------------------------------- #
class RunsCode:
    def __reduce__(self):
        return print, ("CODE RAN",)


def test_checkpoint_with_pickled_code_is_refused(datasets, ckpt_dir, tmp_path):
    bad = tmp_path / "epoch_3.pth"
    torch.save({**torch.load(ckpt_dir / "epoch_2.pth", weights_only=True), "extra": RunsCode()}, bad)
    args = knn_test_args(datasets[1], tmp_path / "results", "--checkpoint", str(bad))
    args.remove("knn")
    args.remove("--method")
    res = run(*args)
    line = error_line(res, "test.py")
    assert f"{bad} is not a plain tensor checkpoint" in line and "refused" in line and "print" in line
    assert "weights_only" not in res.stderr and "CODE RAN" not in res.stdout
    assert not (tmp_path / "results").exists()
    # as the last epoch of a training run it is refused too, not skipped like a damaged file
    out = tmp_path / "ckpt"
    shutil.copytree(ckpt_dir, out)
    shutil.copy(bad, out / "epoch_3.pth")
    before = files(out)
    with pytest.raises(CheckpointError) as e:
        train.train(TrainConfig(data_root=str(datasets[0]), dataset="aux", out_dir=str(out), classes=["tiles"],
                                method=MethodConfig(backbone="tiny_clip"), epochs=4, batch_size=4,
                                train_k_shot=1, max_steps=1))
    assert not isinstance(e.value, DamagedCheckpointError) and "not a plain tensor checkpoint" in str(e.value)
    assert files(out) == before


# --------------------------------------------------------------------------- #
# 5. output folders that cannot be written are refused before the work
# --------------------------------------------------------------------------- #
@pytest.fixture
def immutable(tmp_path):
    """A folder that even root cannot write into (chattr +i): a real EPERM, not a simulated one."""
    folder = tmp_path / "immutable"
    folder.mkdir()
    made = []

    def freeze(path: Path) -> Path:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i not available here (see test_permission_check_uses_os_access)")
        made.append(path)
        return path

    yield freeze
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("entry", ["train.py", "test.py"])
@pytest.mark.parametrize("how", ["parent_is_a_file", "immutable"])
def test_unwritable_output_folder_is_refused_first(datasets, tmp_path, immutable, entry, how):
    if how == "parent_is_a_file":
        blocker = tmp_path / "a_file"
        blocker.write_text("x")
        needle = f"{blocker} is a file, not a folder"
    else:
        blocker = immutable(tmp_path / "immutable")
        needle = f"permission denied or read-only ({blocker} is the nearest existing folder)"
    if entry == "train.py":
        out = blocker / "ckpt"
        res = run(*train_args(datasets[0], out))
        what = f"cannot write the checkpoint folder {out}"
    else:
        res = run(*knn_test_args(datasets[1], blocker / "results"))
        what = f"cannot write the results folder {run_folder(blocker / 'results')}"
    line = error_line(res, entry)
    assert what in line and needle in line
    assert "fsad.test: method" not in res.stderr  # refused before any model was built
    assert files(tmp_path) == ({"a_file": b"x"} if how == "parent_is_a_file" else {})


def test_finished_run_in_a_read_only_folder_is_still_skipped(datasets, finished, tmp_path, immutable):
    results = tmp_path / "archive"
    shutil.copytree(finished[0], results)
    immutable(run_folder(results))
    before = files(results)
    res = run(*knn_test_args(datasets[1], results))
    assert res.returncode == 0 and "already evaluated (read-only folder)" in res.stderr, res.stderr
    assert files(results) == before


def test_indexer_on_an_unwritable_root_names_meta_json(datasets, tmp_path, immutable):
    root = tmp_path / "data"
    shutil.copytree(datasets[1] / "candle", root / "candle")
    immutable(root)
    res = run("data/mvtec.py", "--root", str(root))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert str(root / "meta.json") in lines[0] and "not permitted" in lines[0]


def test_permission_check_uses_os_access(tmp_path, monkeypatch):
    # where chattr is unavailable this still runs the branch a read-only folder takes
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(OutputError, match=f"cannot write the results folder {tmp_path / 'x'}: permission denied"):
        check_writable(tmp_path / "x", "results folder")
    check_writable(tmp_path.parent / "elsewhere", "results folder")


def test_launcher_checks_its_output_folders_before_training(datasets, tmp_path):
    # checkpoints could be written, but not the results of the test on 'visa': refused before training
    results = tmp_path / "results"
    blocker = results / "m_nam1_nan" / "visa"  # the results folder is named by the test settings
    blocker.parent.mkdir(parents=True)
    blocker.write_text("x")
    env = {"MVTEC_ROOT": str(datasets[0]), "VISA_ROOT": str(datasets[1]), "FDSL_BACKBONE": "tiny_clip",
           "RESULTS_ROOT": str(results), "FDSL_EPOCHS_MVTEC": "1", "FDSL_EPOCHS_VISA": "1", "FDSL_MAX_STEPS": "1",
           "FDSL_TRAIN_K_SHOT": "1"}
    line = error_line(run("launch.py", "train_and_test", "m", "cpu", "1", "nan", "13", "2", "0.5", "0", "1",
                          env=env), "launch.py")
    assert f"cannot write the results folder {blocker / '1shot' / 'seed0'}: {blocker} is a file" in line
    assert files(tmp_path) == {"results/m_nam1_nan/visa": b"x"}  # nothing trained


# --------------------------------------------------------------------------- #
# 6. a results folder of another configuration: the hint offers what exists
# --------------------------------------------------------------------------- #
def test_other_configuration_hint_offers_model_name_or_deleting(datasets, finished):
    results = finished[0]
    before = files(results)
    res = run(*knn_test_args(datasets[1], results, "--eval-size", "16"))
    line = error_line(res, "test.py")
    assert f"{run_folder(results)} holds results of another configuration (differs in eval_size)" in line
    assert "another model_name" in line and "delete that folder" in line and "--force" not in line
    assert files(results) == before


# --------------------------------------------------------------------------- #
# 7. the log of a failed run records what stopped it
# --------------------------------------------------------------------------- #
def truncated_image_copy(root: Path, dest: Path, rel: str) -> Path:
    shutil.copytree(root, dest)
    img = dest / rel
    img.write_bytes(img.read_bytes()[:200])
    return img


def test_failed_test_run_logs_its_error(datasets, tmp_path):
    img = truncated_image_copy(datasets[1], tmp_path / "data", "candle/test/good/000.png")
    res = run(*knn_test_args(tmp_path / "data", tmp_path / "results"))
    line = error_line(res, "test.py")
    assert line == f"test.py: error: cannot read image {img}: image file is truncated"
    run_dir = run_folder(tmp_path / "results")
    log = (run_dir / "log.txt").read_text().splitlines()
    assert log[-1].endswith(f" error: cannot read image {img}: image file is truncated")
    assert sorted(os.listdir(run_dir)) == ["log.txt"]  # no metrics, config or lock


def test_unexpected_error_is_logged_with_its_traceback(datasets, tmp_path, monkeypatch):
    from utils.config import TestConfig

    script = load_test_script()

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(script, "evaluate_category", boom)
    cfg = TestConfig(data_root=str(datasets[1]), dataset="target", method="knn", backbone="tiny_clip",
                     results_root=str(tmp_path), model_name="m", classes=["candle"], eval_size=32)
    with pytest.raises(RuntimeError, match="boom"):
        script.evaluate(cfg)
    log = (run_folder(tmp_path) / "log.txt").read_text()
    assert "error: unexpected RuntimeError: boom\nTraceback (most recent call last)" in log
    assert log.rstrip().endswith("RuntimeError: boom")


# --------------------------------------------------------------------------- #
# 8. every option has a help text with its default
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("script", ["train", "test"])
def test_every_option_has_help_and_default(script):
    module = train if script == "train" else load_test_script()
    parser = module.build_parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, action.option_strings
        assert "%(default)s" in action.help or "default:" in action.help or "(required)" in action.help, \
            action.option_strings
    text = parser.format_help()
    assert "default: None" not in text and "(default: 8)" in text


# --------------------------------------------------------------------------- #
# 9. one line for user errors, also from DataLoader workers; bugs keep their traceback
# --------------------------------------------------------------------------- #
def test_dataset_error_in_a_worker_is_one_line(datasets, tmp_path):
    img = truncated_image_copy(datasets[0], tmp_path / "data", "tiles/test/good/000.png")
    out = tmp_path / "ckpt"
    # all 16 test images of 'tiles' in the first batch, so the damaged one is read by the worker
    res = run(*train_args(tmp_path / "data", out, "--workers", "1", "--batch-size", "16"))
    line = error_line(res, "train.py")
    assert line == f"train.py: error: cannot read image {img}: image file is truncated"
    assert (out / "train_log.txt").read_text().splitlines()[-1] == line.removeprefix("train.py: ")
    assert not list(out.glob("*.pth")) and not (out / LOCK_NAME).exists()


def test_worker_exception_is_unwrapped_to_its_message():
    from torch._utils import ExceptionWrapper

    from data.meta import DatasetError

    try:
        raise DatasetError("cannot read image x.png: image file is truncated")
    except DatasetError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DatasetError) as e:
        wrapped.reraise()
    assert "Original Traceback" in str(e.value)  # what torch does to it
    assert user_error(e.value) == "cannot read image x.png: image file is truncated"


def test_run_cli_one_line_for_user_errors_traceback_for_bugs(capsys):
    def denied():
        raise PermissionError(13, "Permission denied", "/results/m")

    assert run_cli("prog", denied) == 2
    assert capsys.readouterr().err == "prog: error: [Errno 13] Permission denied: '/results/m'\n"
    with pytest.raises(ZeroDivisionError):
        run_cli("prog", lambda: 1 / 0)
