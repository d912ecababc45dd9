"""Process bodies for tests/test_distributed.py: each rank sets the torchrun environment, runs
test.py's evaluate or train.py's train, and writes its outcome to a file the test reads (rank 0
may not be the one that fails, and every rank's message matters)."""
from __future__ import annotations

import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_rank_env(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), FSAD_DIST_TIMEOUT="120")


def start(fn, world: int, *args, timeout: float = 300) -> list[int | None]:
    """Run fn(rank, world, port, *args) in `world` fresh processes; wait for each (no process is
    killed because another failed, unlike mp.spawn's join); return their exit codes."""
    import torch.multiprocessing as mp

    port = free_port()
    ctx = mp.start_processes(fn, args=(world, port, *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    for p in ctx.processes:
        p.join(max(1.0, deadline - time.monotonic()))
    codes = [p.exitcode for p in ctx.processes]
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
            p.join()
    return codes


def _outcome(out: Path, rank: int, fn) -> None:
    import torch

    torch.set_num_threads(1)  # two ranks on a shared 2-core machine
    try:
        result = fn()
        record = {"ok": True, "result": result}
    except BaseException as e:  # noqa: BLE001 - the test inspects every rank's error
        record = {"ok": False, "type": type(e).__name__, "error": str(e), "traceback": traceback.format_exc()}
    (out / f"rank{rank}.json").write_text(json.dumps(record))


def load_script(name: str):
    import importlib.util

    sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location(f"fsad_{name}_script", REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def evaluate(rank: int, world: int, port: int, cfg: dict, out: str, kill_rank: int | None = None) -> None:
    """test.py's evaluate(TestConfig(**cfg)) on this rank; with kill_rank, that rank dies (os._exit)
    when it starts its first category, as a crashed or OOM-killed process would."""
    set_rank_env(rank, world, port)
    test_script = load_script("test")
    from utils.config import TestConfig

    started = test_script.evaluate_category

    def record(method, cfg, root, meta, cls, *a, **k):  # which categories this rank started
        with open(Path(out) / f"rank{rank}.categories", "a", encoding="utf-8") as f:
            f.write(cls + "\n")
        return started(method, cfg, root, meta, cls, *a, **k)
    test_script.evaluate_category = record
    if kill_rank == rank:
        def die(*a, **k):
            os._exit(3)
        test_script.evaluate_category = die
    _outcome(Path(out), rank, lambda: str(test_script.evaluate(TestConfig(**cfg), force=True)))


def train(rank: int, world: int, port: int, runs: list[dict], out: str, resume_check: bool = False) -> None:
    """train.py's train for each config in turn (one process group); with resume_check, the last
    run's final checkpoint is then removed (rank 0) and the run resumed from the one before."""
    set_rank_env(rank, world, port)
    train_script = load_script("train")
    from utils import distributed
    from utils.config import MethodConfig, TrainConfig

    def work():
        paths = []
        for cfg in runs:
            cfg = TrainConfig(**{**cfg, "method": MethodConfig(**cfg["method"])})
            paths.append(str(train_script.train(cfg)))
        if resume_check:
            last = Path(paths[-1])
            distributed.barrier()
            if rank == 0:
                last.rename(last.with_name("uninterrupted.pth"))
            distributed.barrier()
            paths.append(str(train_script.train(cfg)))
        return paths

    _outcome(Path(out), rank, work)


def batchnorm(rank: int, world: int, port: int, out: str, sync: bool, device: str = "cpu") -> None:
    """One training step of a BatchNorm1d on this rank's half of a fixed batch (GlobalBatchNorm on
    the CPU, SyncBatchNorm over NCCL with device 'cuda', when `sync`; plain BatchNorm otherwise)
    inside DDP; writes output, input gradient, parameter gradients and running statistics."""
    set_rank_env(rank, world, port)
    import torch
    import torch.distributed as dist

    from utils import distributed

    def work():
        dev = torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")
        distributed.init(dev)
        torch.manual_seed(0)
        x = (torch.randn(12, 5) * 3 + 2).double()
        target = torch.randn(12, 5).double()
        bn = torch.nn.BatchNorm1d(5).double()
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        bn = bn.to(dev)
        if sync:
            bn = distributed.sync_batchnorm(bn, dev)
        model = torch.nn.parallel.DistributedDataParallel(bn, device_ids=[dev] if dev.type == "cuda" else None)
        part = x.chunk(world)[rank].clone().to(dev).requires_grad_(True)
        y = model(part)
        ((y - target.chunk(world)[rank].to(dev)) ** 2).mean().backward()
        grads = [None] * world
        dist.all_gather_object(grads, part.grad.tolist())
        outs = [None] * world
        dist.all_gather_object(outs, y.detach().tolist())
        return {"y": [r for o in outs for r in o], "x_grad": [r for g in grads for r in g],
                "w_grad": bn.weight.grad.tolist(), "b_grad": bn.bias.grad.tolist(),
                "running_mean": bn.running_mean.tolist(), "running_var": bn.running_var.tolist()}

    _outcome(Path(out), rank, work)
