"""Several processes on the CPU (gloo): sharded evaluation gives one process's results, failures
stop every rank without results, DDP training is reproducible and BatchNorm sees the global batch.

Ranks are started with torch.multiprocessing (tests/dist_workers.py sets the torchrun environment
per rank) or, for the command lines, through torchrun and the launchers' NPROC."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dist_workers
from conftest import load_test_script
from utils import distributed
from utils.config import TestConfig

REPO = Path(__file__).resolve().parents[1]
RESULT_FILES = ("metrics.json", "config.json", "table.md")


def outcomes(out: Path, world: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@contextlib.contextmanager
def one_thread():
    """The ranks' thread count for a single-process reference (and no OpenMP stalls on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def one_process(cfg: TestConfig) -> Path:
    with one_thread():
        return load_test_script().evaluate(cfg, force=True)


def comparable_config(run: Path) -> dict:
    config = json.loads((run / "config.json").read_text())
    for key in ("results_root", "model_name"):  # where each run was written
        config["test"].pop(key)
    return config


@pytest.fixture(scope="module")
def quick_checkpoint(datasets, tmp_path_factory):
    import train
    from utils.config import MethodConfig, TrainConfig

    cfg = TrainConfig(data_root=str(datasets[0]), dataset="aux", out_dir=str(tmp_path_factory.mktemp("quick")),
                      method=MethodConfig(backbone="tiny_clip"), epochs=1, max_steps=2, batch_size=8,
                      train_k_shot=2, seed=0)
    return train.train(cfg)


# --------------------------------------------------------------------------------------------
# sharded evaluation


@pytest.mark.parametrize("case", ["knn-2ranks", "fdsl-mul-3ranks-idle", "subspacead-2ranks"])
def test_sharded_evaluation_writes_what_one_process_writes(case, datasets, quick_checkpoint, tmp_path):
    """2 ranks on 3 categories (2 + 1), and 3 ranks on 2 categories (one rank idle): metrics.json,
    table.md and config.json are those of one process, value for value (subspacead: the rotated
    copies of a category's references do not depend on the rank that fits them)."""
    if case.startswith("knn"):
        world, base = 2, dict(data_root=str(datasets[0]), dataset="aux", method="knn", backbone="tiny_clip")
    elif case.startswith("subspacead"):
        world, base = 2, dict(data_root=str(datasets[0]), dataset="aux", method="subspacead", backbone="tiny_dinov2",
                              image_size=56, params={"augment_count": 2})
    else:
        world, base = 3, dict(data_root=str(datasets[1]), dataset="target", checkpoint=str(quick_checkpoint),
                              winmode="mul", win_size=8, win_stride=2, k_shot=2)
    base.update(results_root=str(tmp_path), seed=1)
    single = one_process(TestConfig(**base, model_name="single"))
    out = tmp_path / "ranks"
    out.mkdir()
    cfg = {**base, "model_name": "sharded"}
    codes = dist_workers.start(dist_workers.evaluate, world, cfg, str(out))
    assert codes == [0] * world
    got = outcomes(out, world)
    assert all(o["ok"] for o in got), got
    sharded = Path(got[0]["result"])
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (single, sharded))
    for key in ("per_category", "mean", "excluded"):
        assert a[key] == b[key], key
    assert list(a["per_category"]) == list(b["per_category"])  # the categories' order too
    assert (single / "table.md").read_text() == (sharded / "table.md").read_text()
    assert comparable_config(single) == comparable_config(sharded)
    log = (sharded / "log.txt").read_text()  # rank 0's log holds every rank's categories
    assert all(f"{c}: i-AUROC" in log for c in a["per_category"]), log


def _corrupt_rank1_category(src: Path, dst: Path) -> str:
    """A copy of the dataset whose category evaluated by rank 1 (of 2) has an unreadable test image."""
    from data.dataset import load_meta

    shutil.copytree(src, dst)
    meta = load_meta(dst)
    classes = sorted(meta["test"])
    cls = distributed.assign(classes, [len(meta["test"][c]) for c in classes], 2)[1][0]
    bad = dst / meta["test"][cls][-1]["img_path"]
    bad.write_bytes(b"not a png")
    return cls


def test_a_failing_rank_fails_every_rank_and_writes_nothing(datasets, tmp_path):
    cls = _corrupt_rank1_category(datasets[0], tmp_path / "data")
    out = tmp_path / "ranks"
    out.mkdir()
    cfg = dict(data_root=str(tmp_path / "data"), dataset="aux", method="knn", backbone="tiny_clip",
               results_root=str(tmp_path / "results"), model_name="broken")
    codes = dist_workers.start(dist_workers.evaluate, 2, cfg, str(out))
    assert codes == [0, 0]  # both processes returned (with an error) instead of hanging
    r0, r1 = outcomes(out, 2)
    assert not r0["ok"] and not r1["ok"]
    assert r1["type"] == "DatasetError" and cls in r1["error"]  # its own error (a ValueError), naming the file
    assert r0["type"] == "RankFailed"
    assert f"rank 1 failed on '{cls}'" in r0["error"] and "no results were written" in r0["error"]
    run = tmp_path / "results" / "broken" / "aux" / "1shot" / "seed0"
    assert not any((run / f).exists() for f in RESULT_FILES)


def test_a_killed_rank_fails_the_others_and_writes_nothing(datasets, tmp_path):
    out = tmp_path / "ranks"
    out.mkdir()
    cfg = dict(data_root=str(datasets[0]), dataset="aux", method="knn", backbone="tiny_clip",
               results_root=str(tmp_path / "results"), model_name="killed")
    codes = dist_workers.start(dist_workers.evaluate, 2, cfg, str(out), 1)
    assert codes[1] == 3 and codes[0] == 0  # rank 1 died; rank 0 did not hang
    r0 = json.loads((out / "rank0.json").read_text())
    assert not r0["ok"] and r0["type"] == "RanksLost" and "lost contact" in r0["error"], r0
    assert not (out / "rank1.json").exists()
    run = tmp_path / "results" / "killed" / "aux" / "1shot" / "seed0"
    assert not any((run / f).exists() for f in RESULT_FILES)


def test_a_busy_results_folder_stops_every_rank_before_any_work(datasets, tmp_path):
    """Rank 0 holds the results folder's lock; when another run has it, rank 0 fails at once and the
    other ranks stop at their first exchange, before evaluating any category."""
    from utils.lock import RunLock

    out = tmp_path / "ranks"
    out.mkdir()
    cfg = dict(data_root=str(datasets[0]), dataset="aux", method="knn", backbone="tiny_clip",
               results_root=str(tmp_path / "results"), model_name="busy")
    run = tmp_path / "results" / "busy" / "aux" / "1shot" / "seed0"
    with RunLock(run, "results folder", "use another model_name"):  # this test process is the holder
        codes = dist_workers.start(dist_workers.evaluate, 2, cfg, str(out))
    assert codes == [0, 0]
    r0, r1 = outcomes(out, 2)
    assert r0["type"] == "RunLockedError" and str(run) in r0["error"], r0
    assert r1["type"] == "RankFailed" and "rank 0 failed" in r1["error"] and "RunLockedError" in r1["error"], r1
    assert not list(out.glob("rank*.categories"))  # no rank started a category
    assert not any((run / f).exists() for f in RESULT_FILES)


def test_torchrun_command_line_reports_the_failing_rank(datasets, tmp_path):
    cls = _corrupt_rank1_category(datasets[0], tmp_path / "data")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(REPO / "test.py"), "--data-root", str(tmp_path / "data"), "--dataset", "aux",
                          "--method", "knn", "--backbone", "tiny_clip", "--results-root", str(tmp_path / "r"),
                          "--model-name", "cli"], capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**os.environ, "FSAD_DIST_TIMEOUT": "120"})
    assert res.returncode != 0
    assert f"test.py: error: rank 1 failed on '{cls}'" in res.stderr, res.stderr[-3000:]
    assert not (tmp_path / "r" / "cli" / "aux" / "1shot" / "seed0" / "metrics.json").exists()


# --------------------------------------------------------------------------------------------
# data-parallel training


def _train_cfg(root: Path, out: Path, **kw) -> dict:
    return dict(data_root=str(root), dataset="aux", out_dir=str(out), method={"backbone": "tiny_clip"}, epochs=2,
                max_steps=3, batch_size=8, train_k_shot=2, seed=4, **kw)


def _heads(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state"]


def _maps_of(checkpoint) -> torch.Tensor:
    from methods.checkpoint import load_method

    method, _ = load_method(checkpoint)
    x = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    return method.predict(x[1:], method.fit(x[:1]), (64, 64))[0]


def test_ddp_training_is_reproducible_resumes_and_tracks_one_process(datasets, tmp_path):
    """Two 2-process runs with one seed give the same heads; a resumed 2-process run gives the
    uninterrupted one; a 1-process run with the same global batch stays within float noise."""
    import train
    from utils.config import MethodConfig, TrainConfig

    runs = {}
    for name, resume in (("a", True), ("b", False)):
        out = tmp_path / f"ranks_{name}"
        out.mkdir()
        cfg = _train_cfg(datasets[0], tmp_path / name)
        assert dist_workers.start(dist_workers.train, 2, [cfg], str(out), resume) == [0, 0]
        got = outcomes(out, 2)
        assert all(o["ok"] for o in got), got
        runs[name] = got[0]["result"]
    a, b = _heads(runs["a"][0]), _heads(runs["b"][0])
    for k in a:
        assert torch.equal(a[k], b[k]), k  # same seed, same world size: bit for bit
    resumed = _heads(runs["a"][1])
    uninterrupted = _heads(tmp_path / "a" / "uninterrupted.pth")
    for k in resumed:
        assert torch.equal(resumed[k], uninterrupted[k]), k
    assert all(v.dtype in (torch.float32, torch.int64) for v in a.values())  # plain BatchNorm keys and dtypes
    log = (tmp_path / "a" / "train_log.txt").read_text()
    assert "processes 2" in log

    with one_thread():
        single = train.train(TrainConfig(**{**_train_cfg(datasets[0], tmp_path / "one"),
                                            "method": MethodConfig(backbone="tiny_clip")}))
    one = _heads(single)
    diff = max((one[k].double() - a[k].double()).abs().max().item() for k in one)
    maps = [_maps_of(p) for p in (single, runs["a"][0])]
    map_diff = (maps[0] - maps[1]).abs().max().item()
    print(f"\n1 process vs 2 processes (global batch 8, 6 Adam steps): heads max |diff| {diff:.2e}, "
          f"maps max |diff| {map_diff:.2e}")
    # same samples per global batch, synchronised BatchNorm, per-sample losses: the same function up
    # to the order of float sums. Parameters drift more: the first BatchNorm's shift has a zero true
    # gradient (the next BatchNorm removes it), so Adam turns its rounding noise into steps of ~lr
    assert map_diff < 1e-5
    losses = [[float(line.split()[3]) for line in (d / "train_log.txt").read_text().splitlines()]
              for d in (tmp_path / "one", tmp_path / "b")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def _check_global_batchnorm(out: Path, sync: bool) -> None:
    """The ranks' outcome against BatchNorm on the whole batch: equal (sync) or not (plain)."""
    got = outcomes(out, 2)
    assert all(o["ok"] for o in got), got
    r = got[0]["result"]
    torch.manual_seed(0)
    x = (torch.randn(12, 5) * 3 + 2).double().requires_grad_(True)
    target = torch.randn(12, 5).double()
    bn = torch.nn.BatchNorm1d(5).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    y = bn(x)
    # each rank's loss is the mean over its half; DDP averages parameter gradients over ranks
    sum(((yy - tt) ** 2).mean() for yy, tt in zip(y.chunk(2), target.chunk(2))).backward()
    ref = {"y": y.detach(), "x_grad": x.grad, "w_grad": bn.weight.grad / 2, "b_grad": bn.bias.grad / 2,
           "running_mean": bn.running_mean, "running_var": bn.running_var}
    close = {k: torch.allclose(torch.tensor(r[k], dtype=torch.float64), v, rtol=1e-9, atol=1e-12)
             for k, v in ref.items()}
    if sync:
        assert all(close.values()), close
    else:
        assert not close["y"] and not close["running_var"]


@pytest.mark.parametrize("sync", [True, False])
def test_batchnorm_over_ranks_is_batchnorm_of_the_global_batch(sync, tmp_path):
    """GlobalBatchNorm under DDP on two halves = BatchNorm on the whole batch (outputs, gradients,
    running statistics); plain BatchNorm (the control) normalises each half by itself."""
    out = tmp_path / "ranks"
    out.mkdir()
    assert dist_workers.start(dist_workers.batchnorm, 2, str(out), sync) == [0, 0]
    _check_global_batchnorm(out, sync)


@pytest.mark.cuda(gpus=2)
@pytest.mark.parametrize("sync", [True, False])
def test_syncbatchnorm_over_nccl_is_batchnorm_of_the_global_batch(sync, tmp_path):
    """The same on two GPUs: torch's SyncBatchNorm over NCCL (what train.py uses on CUDA)."""
    out = tmp_path / "ranks"
    out.mkdir()
    assert dist_workers.start(dist_workers.batchnorm, 2, str(out), sync, "cuda") == [0, 0]
    _check_global_batchnorm(out, sync)


# --------------------------------------------------------------------------------------------
# launchers: NPROC


@pytest.fixture(scope="module")
def launch_env(tmp_path_factory):
    from data.synthetic import generate

    root = tmp_path_factory.mktemp("nproc")
    a = generate(root / "a", ("tiles", "bolt"), seed=3, size=64, n_train=3, n_test_good=3, n_test_bad=4)
    b = generate(root / "b", ("candle", "pcb", "fabric"), seed=4, size=64, n_train=3, n_test_good=3, n_test_bad=4)
    return {"MVTEC_ROOT": str(a), "MVTEC_NAME": "a", "VISA_ROOT": str(b), "VISA_NAME": "b", "FSAD_BACKBONE": "tiny_clip",
            "FSAD_EPOCHS_MVTEC": "1", "FSAD_EPOCHS_VISA": "1", "FSAD_MAX_STEPS": "2", "FSAD_TRAIN_K_SHOT": "2",
            "FSAD_BATCH_SIZE": "4", "RESULTS_ROOT": str(root / "results"), "PYTHON": sys.executable,
            "FSAD_DIST_TIMEOUT": "120"}


def run_folder(results_root, name: str) -> Path:
    """The launch's results folder: the model name with its settings tag (e.g. one_nan)."""
    found = sorted(Path(results_root).glob(f"{name}_*"))
    assert len(found) == 1, found
    return found[0]


def launcher(script: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / script), *args], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env={**{k: v for k, v in os.environ.items() if k != "NPROC"}, **env})


def test_launcher_nproc_gives_the_single_process_results(launch_env):
    """METHOD=knn test_few_shot.sh with NPROC=2 on the CPU (gloo) = the same without NPROC."""
    args = ["{name}", "cpu", "1", "nan", "13", "2", "0.5", "2", "1"]
    runs = {}
    for name, extra in (("one", {}), ("two", {"NPROC": "2"})):
        res = launcher("test_few_shot.sh", [a.format(name=name) for a in args], {**launch_env, "METHOD": "knn", **extra})
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = run_folder(launch_env["RESULTS_ROOT"], name)
    for dataset in ("a", "b"):
        one, two = (json.loads((runs[n] / dataset / "1shot" / "seed2" / "metrics.json").read_text()) for n in runs)
        assert one["per_category"] == two["per_category"] and one["mean"] == two["mean"]
    stamp = (runs["two"] / "b" / "1shot" / "seed2" / "metrics.json").stat().st_mtime_ns
    again = launcher("test_few_shot.sh", [a.format(name="two") for a in args], {**launch_env, "METHOD": "knn",
                                                                                  "NPROC": "2"})
    assert again.returncode == 0, again.stderr[-3000:]  # every rank skips the finished runs, together
    assert (runs["two"] / "b" / "1shot" / "seed2" / "metrics.json").stat().st_mtime_ns == stamp


def test_launcher_nproc_trains_with_ddp_and_tests_sharded(launch_env):
    res = launcher("trainAndTest.sh", ["ddp", "cpu", "1", "nan", "13", "2", "0.5", "0", "1"],
                   {**launch_env, "NPROC": "2"})
    assert res.returncode == 0, res.stderr[-3000:]
    logs = list((Path(launch_env["RESULTS_ROOT"]) / "ddp" / "checkpoints").glob("train_a_*/seed*/train_log.txt"))
    assert len(logs) == 1 and "processes 2" in logs[0].read_text()
    results = run_folder(launch_env["RESULTS_ROOT"], "ddp")
    for dataset in ("a", "b"):
        assert all((results / dataset / "1shot" / "seed0" / f).is_file() for f in RESULT_FILES)


def test_launcher_precision_variable_is_recorded_and_checked(launch_env, tmp_path):
    env = {**launch_env, "METHOD": "knn", "RESULTS_ROOT": str(tmp_path), "FSAD_PRECISION": "bf16"}
    res = launcher("test_few_shot.sh", ["p", "cpu", "1", "nan", "13", "2", "0.5", "0", "1"], env)
    assert res.returncode == 0, res.stderr[-3000:]
    config = json.loads((run_folder(tmp_path, "p") / "b" / "1shot" / "seed0" / "config.json").read_text())
    assert config["test"]["precision"] == "bf16"
    bad = launcher("trainAndTest.sh", ["q", "cpu", "1", "nan", "13", "2", "0.5", "0", "1"],
                   {**env, "METHOD": "fdsl", "FSAD_PRECISION": "half"})
    assert bad.returncode == 2 and "FSAD_PRECISION" in bad.stderr and "'half'" in bad.stderr, bad.stderr
    assert not any(tmp_path.rglob("*.pth"))  # refused before any training


@pytest.mark.parametrize("nproc, device, message", [
    ("2", "0,1", "no usable CUDA GPU"),  # a CUDA device list on a machine without one
    ("two", "cpu", "NPROC: expected a number of processes >= 1, got 'two'"),
    ("0", "cpu", "NPROC: expected a number of processes >= 1"),
    ("2", "0,1,2", "lists 3 GPU(s) for 2 process(es)"),
    ("2", "0", "names one GPU, but 2 processes"),
])
def test_launcher_refuses_bad_nproc_and_devices(launch_env, tmp_path, nproc, device, message):
    if torch.cuda.is_available() and message == "no usable CUDA GPU":
        pytest.skip("this machine has a GPU")
    env = {**launch_env, "RESULTS_ROOT": str(tmp_path), "NPROC": nproc}
    res = launcher("trainAndTest.sh", ["x", device, "1", "nan", "13", "2", "0.5", "0", "1"], env)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not any(tmp_path.rglob("*.pth"))


# --------------------------------------------------------------------------------------------
# pieces, without processes


def test_device_rules(monkeypatch):
    """torchrun ranks: 'cpu' for all, 'cuda' or a list for one GPU each; NPROC above the GPU count,
    wrong list lengths and a list in one process are refused by name."""
    from utils.config import resolve_device

    with pytest.raises(ValueError, match="run with NPROC=2"):
        resolve_device("0,1")  # one process, two GPUs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="4 processes need 4 GPUs, but 2 GPU"):
        distributed.check_devices("cuda", 4)
    with pytest.raises(ValueError, match="names a GPU twice"):
        distributed.check_devices("1,1", 2)
    distributed.check_devices("cpu", 8)  # gloo: any number of CPU ranks
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    assert distributed.rank_device("cpu") == torch.device("cpu")
    assert distributed.rank_device("cuda") == torch.device("cuda:1")
    assert distributed.rank_device("1,0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="names one GPU"):
        distributed.rank_device("0")


def test_auto_precision_is_one_value_for_every_rank_of_mixed_gpus(monkeypatch):
    """Two GPUs of which one lacks native bf16: 'auto' gives fp16 on both ranks (ranks that resolved
    it alone would compute, and name their folders, differently); bf16 is refused on both."""
    from utils import precision as base

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(base, "_cuda_bf16", lambda dev, native: dev.index == 0 or not native)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        assert base.resolve_precision("auto", torch.device(f"cuda:{rank}")) == ("bf16" if rank == "0" else "fp16")
        assert distributed.run_precision("auto", "cuda") == "fp16"
        assert distributed.run_precision("fp32", "0,1") == "fp32"
    monkeypatch.setattr(base, "_cuda_bf16", lambda dev, native: dev.index == 0)
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        with pytest.raises(ValueError, match="cuda:1 has no bfloat16 support"):
            distributed.run_precision("bf16", "cuda")


def test_launcher_test_mode_names_heads_of_another_precision(launch_env, tmp_path):
    """test_few_shot.sh at fp32 (auto on CPU) where only bf16-trained heads exist: the error names
    them and FSAD_PRECISION=bf16, before any work."""
    found = tmp_path / "h" / "checkpoints" / "train_a_nam1_bf16" / "seed111" / "epoch_1.pth"
    found.parent.mkdir(parents=True)
    found.write_bytes(b"")  # only its existence is checked
    res = launcher("test_few_shot.sh", ["h", "cpu", "1", "nan", "13", "2", "0.5", "0", "1"],
                   {**launch_env, "RESULTS_ROOT": str(tmp_path)})
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"{found} holds heads trained with precision bf16: set FSAD_PRECISION=bf16" in res.stderr, res.stderr
    assert not list(tmp_path.glob("h_*"))  # no results folder


def test_assignment_balances_and_covers_every_category():
    items, weights = ["a", "b", "c", "d", "e"], [10, 50, 20, 20, 5]
    parts = distributed.assign(items, weights, 2)
    assert sorted(sum(parts, [])) == items and parts == [["b", "e"], ["a", "c", "d"]]  # 55 vs 50
    assert distributed.assign(["a", "b"], [1, 1], 3) == [["a"], ["b"], []]  # an idle rank


@pytest.mark.parametrize("n, batch", [(23, 4), (8, 8), (3, 2)])
def test_sharded_shuffle_keeps_the_one_process_order(n, batch):
    """World 1: exactly DataLoader(shuffle=True, generator) (today's order). World 2 with half the
    batch: the same samples per global step, the epoch padded to an even count."""
    from torch.utils.data import DataLoader

    data = list(range(n))
    seed = 5 * 100_003 + 1
    old = [b.tolist() for b in DataLoader(data, batch_size=batch, shuffle=True,
                                          generator=torch.Generator().manual_seed(seed))]

    def batches(rank, world):
        g = torch.Generator().manual_seed(seed)
        return [b.tolist() for b in DataLoader(data, batch_size=batch // world, generator=g,
                                               sampler=distributed.ShardedShuffle(n, rank, world, g))]
    assert batches(0, 1) == old
    two = list(zip(batches(0, 2), batches(1, 2)))
    flat_old = sum(old, [])
    padded = flat_old + flat_old[: (-n) % 2]
    for step, (x, y) in enumerate(two):
        assert sorted(x + y) == sorted(padded[step * batch:(step + 1) * batch])


def test_global_batch_must_split_evenly(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="batch size 8 is the global batch .* 3 processes"):
        distributed.check_batch_size(8)
    assert distributed.check_batch_size(9) == 3
