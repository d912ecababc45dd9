"""Several processes on one run: sharded evaluation, data-parallel training, one writer.

Started by torchrun (`torchrun --nproc_per_node=N test.py|train.py ...`, or the launchers with
NPROC=N), every process reads RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE. Without them (or
with WORLD_SIZE=1) every function here is a no-op and the code paths are the single-process ones.

Devices (`--device`): `cpu` puts every rank on the CPU (gloo backend); a CUDA index list such
as `0,1` gives local rank i the i-th GPU, `cuda` gives it GPU i (NCCL backend).

Evaluation (test.py): categories are split over the ranks (`shard`), each rank evaluates its
own, and `Shard.gather` exchanges the results with a success flag per rank. A rank that fails
still joins that exchange (the `collective` decorator does it for the failing rank), so every
rank learns of the failure and raises; nobody waits forever and rank 0 writes nothing. Rank 0
writes the results (`Shard.write`) and the others return once they are written.

Training (train.py): DistributedDataParallel over the trainable heads, BatchNorm statistics of
the global batch (`sync_batchnorm`), a seeded shuffle split over the ranks (`train_loader`),
checkpoints written by rank 0.
"""
from __future__ import annotations

import atexit
import functools
import logging
import math
import os
import sys
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, RandomSampler, Sampler

from utils.device import loader_options
from utils.precision import resolve_precision

# Waiting ranks sit in a collective until the slowest rank is done (evaluation: until its last
# category), so the timeout must cover the imbalance between ranks, not one message.
DEFAULT_TIMEOUT_S = 12 * 3600
_OBJECTS = None  # the gloo group of the result exchanges (init)


# ---------------------------------------------------------------------------------------
# who am I
# ---------------------------------------------------------------------------------------

def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}: expected an integer, got '{value}'") from None


def dist_timeout() -> float:
    """FSAD_DIST_TIMEOUT: seconds a process may wait for the others, a number > 0 (default 12 hours)."""
    value = os.environ.get("FSAD_DIST_TIMEOUT", "").strip()
    if not value:
        return float(DEFAULT_TIMEOUT_S)
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"environment variable FSAD_DIST_TIMEOUT: expected a number of seconds > 0, got '{value}'")
    return seconds


def world_size() -> int:
    return max(_env_int("WORLD_SIZE", 1), 1)


def launched() -> bool:
    """True in a process started by torchrun (or equivalent) with more than one process."""
    return world_size() > 1


def rank() -> int:
    return _env_int("RANK", 0) if launched() else 0


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0) if launched() else 0


def local_world_size() -> int:
    return _env_int("LOCAL_WORLD_SIZE", world_size()) if launched() else 1


def is_main() -> bool:
    return rank() == 0


# ---------------------------------------------------------------------------------------
# devices
# ---------------------------------------------------------------------------------------

def _cuda_indices(spec: str, nproc: int) -> list[str] | None:
    """The CUDA devices of `nproc` local processes for a device value, None for 'cpu'. Every rank
    runs the same check, so a refused value is refused by all of them alike."""
    d = str(spec).strip().lower()
    if d == "cpu":
        return None
    if "," in d:
        items = [x.strip() for x in d.split(",")]
        if not all(x.isdigit() for x in items):
            raise ValueError(f"device '{spec}': a device list holds CUDA indices, e.g. 0,1")
        if len(items) != nproc:
            raise ValueError(f"device '{spec}' lists {len(items)} GPU(s) for {nproc} process(es) on this machine; "
                             f"give one index per process (NPROC / --nproc_per_node)")
        if len(set(items)) != len(items):
            raise ValueError(f"device '{spec}' names a GPU twice; each process needs its own")
        return items
    if d == "cuda":
        return [str(i) for i in range(nproc)]
    if nproc > 1:
        raise ValueError(f"device '{spec}' names one GPU, but {nproc} processes run on this machine; give one "
                         f"per process (e.g. {','.join(str(i) for i in range(nproc))}), 'cuda' (GPUs 0..{nproc - 1}) "
                         f"or cpu")
    return [d]


def check_devices(spec: str, nproc: int) -> None:
    """Refuse a device value that cannot give `nproc` processes one device each (before starting them)."""
    from utils.config import resolve_single_device

    indices = _cuda_indices(spec, nproc)
    if indices is None:
        return
    if not torch.cuda.is_available():
        raise ValueError(f"device '{spec}' asks for CUDA, but this machine has no usable CUDA GPU "
                         f"(torch.cuda.is_available() is False); pass 'cpu' instead")
    if nproc > torch.cuda.device_count():
        raise ValueError(f"{nproc} processes need {nproc} GPUs, but {torch.cuda.device_count()} GPU(s) are visible; "
                         f"lower NPROC (--nproc_per_node) or use device cpu")
    for i in indices:
        resolve_single_device(i)


def rank_device(spec: str) -> torch.device:
    """This process's device for a --device value (a list only with several processes)."""
    from utils.config import resolve_single_device

    if not launched():
        if "," in str(spec):
            n = len(str(spec).split(","))
            raise ValueError(f"device '{spec}' lists several GPUs: run with NPROC={n} (launchers) or "
                             f"torchrun --nproc_per_node={n}; one process uses one device")
        return resolve_single_device(spec)
    check_devices(spec, local_world_size())
    indices = _cuda_indices(spec, local_world_size())
    return torch.device("cpu") if indices is None else resolve_single_device(indices[local_rank()])


def run_precision(value: str | None, spec: str) -> str:
    """A run's precision for a --device value, 'auto' made concrete: the same on every process of
    the machine, so no rank computes (or names its folders) differently. 'auto' over GPUs of mixed
    kinds takes fp16 when one of them lacks native bf16; an explicit value one GPU cannot run is
    refused on every rank alike."""
    device = rank_device(spec)  # checks the value (its errors name the device)
    indices = _cuda_indices(spec, local_world_size()) if launched() else None
    if indices is None:
        return resolve_precision(value, device)
    from utils.config import resolve_single_device

    values = {resolve_precision(value, resolve_single_device(i)) for i in indices}
    return "fp16" if "fp16" in values else values.pop()


# ---------------------------------------------------------------------------------------
# process group
# ---------------------------------------------------------------------------------------

def init(device: torch.device) -> bool:
    """Join the process group (once per process); gloo on CPU, NCCL on CUDA. False when alone."""
    if not launched():
        return False
    if dist.is_initialized():
        return True
    # Imported after the group exists, torch.distributed._shard (which timm and open_clip pull in
    # through torch._dynamo when a backbone is built) keeps the group alive past
    # destroy_process_group, and its gloo threads then abort the process at exit. Import first.
    import torch._dynamo  # noqa: F401

    device = torch.device(device)
    timeout = timedelta(seconds=dist_timeout())
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    global _OBJECTS
    # result exchanges go through gloo even next to NCCL: they carry Python objects, a waiting rank
    # does not hold a GPU kernel for hours, and a dead peer closes its socket (an error at once,
    # where NCCL would wait for the timeout)
    _OBJECTS = dist.new_group(backend="gloo", timeout=timeout)
    atexit.register(_destroy)
    return True


def _destroy() -> None:
    global _OBJECTS
    if dist.is_initialized():
        dist.destroy_process_group()  # every group, _OBJECTS included
    _OBJECTS = None


def barrier() -> None:
    if launched() and dist.is_initialized():
        dist.barrier()


class RankFailed(ValueError):
    """A rank of a multi-process run failed; raised on every other rank, naming it and its error
    (a ValueError: the entry points print it as one line)."""


class RanksLost(RuntimeError):
    """A collective itself broke: a rank died (killed, crashed) or stopped answering."""


# ---------------------------------------------------------------------------------------
# one multi-process run: every rank makes the same exchanges, in the same order
# ---------------------------------------------------------------------------------------

class _Run:
    """The exchanges of one decorated call. Each is one all_gather_object of (status, payload);
    after an exchange that reveals a failure (or the last one) the run is closed everywhere."""

    def __init__(self):
        self.closed = False
        self.current: str | None = None  # what this rank works on (a category), for error messages

    def exchange(self, status: str, payload: Any = None, last: bool = False) -> list[Any]:
        if self.closed:
            raise RuntimeError("distributed run: exchange after the run was closed")
        out: list[Any] = [None] * world_size()
        try:
            dist.all_gather_object(out, (status, payload), group=_OBJECTS)
        except Exception as e:  # noqa: BLE001 - gloo and NCCL raise various types for a lost peer
            self.closed = True
            raise RanksLost(f"rank {rank()}: lost contact with the other ranks (one was killed or crashed?): "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        failed = [(r, p) for r, (s, p) in enumerate(out) if s == "failed"]
        if failed:
            self.closed = True
            raise RankFailed("; ".join(f"rank {r} failed{f' on {p[0]}' if p[0] else ''}: {p[1]}" for r, p in failed)
                             + " (no results were written)")
        statuses = {s for s, _ in out}
        if len(statuses) > 1:
            self.closed = True
            raise RankFailed(f"ranks disagree ({', '.join(f'rank {r}: {s}' for r, (s, _) in enumerate(out))}): "
                             f"did the files change while the run started? Nothing was written")
        self.closed = last
        return [p for _, p in out]

    def fail(self, exc: BaseException) -> None:
        """Join the exchange the other ranks wait in, with this rank's error."""
        if self.closed:
            return
        what = f"'{self.current}'" if self.current else ""
        try:
            self.exchange("failed", (what, f"{type(exc).__name__}: {exc}"))
        except (RankFailed, RanksLost):
            pass  # expected: this rank's own failure is in the exchange


_RUNS: list[_Run] = []


def collective(fn: Callable) -> Callable:
    """For a function whose ranks exchange results (test.py's evaluate): a rank that raises still
    takes part in the exchange the others wait in, so they fail with its error instead of
    waiting; a rank that returns without any exchange (a finished run, skipped) checks that all
    others skipped too. Alone, `fn` runs as it is."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not launched():
            return fn(*args, **kwargs)
        run = _Run()
        _RUNS.append(run)
        try:
            out = fn(*args, **kwargs)
        except RankFailed:
            raise
        except BaseException as e:
            run.fail(e)
            raise
        finally:
            _RUNS.pop()
        if not run.closed:  # returned before any exchange: every rank must have done the same
            run.exchange("skipped", last=True)
        return out

    return wrapper


# ---------------------------------------------------------------------------------------
# sharded evaluation
# ---------------------------------------------------------------------------------------

def assign(items: Sequence[str], weights: Sequence[float], world: int) -> list[list[str]]:
    """Items per rank: the heaviest first, each to the least loaded rank (ties: lowest rank),
    kept in their given order within a rank. Deterministic, so every rank computes the same."""
    load = [0.0] * world
    owner: dict[str, int] = {}
    for i in sorted(range(len(items)), key=lambda i: (-float(weights[i]), i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[items[i]] = r
        load[r] += float(weights[i])
    return [[it for it in items if owner[it] == r] for r in range(world)]


class _Capture(logging.Handler):
    """Keeps a non-main rank's log records of the run, to be replayed into rank 0's log file."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        record.msg, record.args = record.getMessage(), None  # plain text: picklable whatever the args
        record.exc_info = record.exc_text = None
        self.records.append(record)


class Shard:
    """This rank's share of a run's items; iterate over it to work on them."""

    def __init__(self, items: Sequence[str], weights: Sequence[float], log: logging.Logger | None):
        self.items = list(items)
        self.run = _RUNS[-1] if _RUNS else None
        if launched() and self.run is None:
            raise RuntimeError("distributed.shard() needs a function decorated with @distributed.collective")
        if self.run is not None:
            # every rank has passed its checks (results folder lock, data, k): a rank that failed them
            # stops the others here, before hours of work, rather than at the final exchange
            self.run.exchange("started")
        self.mine = assign(self.items, weights, world_size())[rank()] if launched() else list(self.items)
        self.log = log
        self.capture = None
        if launched() and not is_main() and log is not None:
            self.capture = _Capture()
            log.addHandler(self.capture)

    @property
    def is_main(self) -> bool:
        return is_main()

    def __len__(self) -> int:
        return len(self.mine)

    def __iter__(self):
        for item in self.mine:
            if self.run is not None:
                self.run.current = item
            yield item
        if self.run is not None:
            self.run.current = None

    def _stop_capture(self) -> list[logging.LogRecord]:
        if self.capture is None:
            return []
        self.log.removeHandler(self.capture)
        records, self.capture = self.capture.records, None
        return records

    def gather(self, *parts: dict) -> tuple[dict, ...]:
        """Every rank's results (dicts keyed by item), merged in the items' order, on every rank.
        Raises RankFailed on every rank when one failed."""
        if self.run is None:
            return parts
        records = self._stop_capture()
        got = self.run.exchange("done", (parts, records))
        if self.log is not None and is_main():
            for r, (_, recs) in enumerate(got):
                for rec in recs:  # rank r's log lines, with their own times
                    rec.msg = f"[rank {r}] {rec.msg}"
                    self.log.handle(rec)
        merged = []
        for i in range(len(parts)):
            union = {k: v for p, _ in got for k, v in p[i].items()}
            missing = [it for it in self.items if it not in union]
            if missing:
                raise RuntimeError(f"distributed run: no rank returned {missing}")
            merged.append({it: union[it] for it in self.items})
        return tuple(merged)

    def write(self, fn: Callable, *args, **kwargs):
        """Rank 0 runs `fn` (writes the results); every rank returns once it has succeeded, and
        fails if it failed. Returns fn's value on rank 0, None elsewhere."""
        if self.run is None:
            return fn(*args, **kwargs)
        out = fn(*args, **kwargs) if is_main() else None  # an error here reaches the others via `collective`
        self.run.exchange("written", last=True)
        return out

    def close(self) -> None:
        self._stop_capture()


def shard(items: Sequence[str], weights: Sequence[float] | None = None,
          log: logging.Logger | None = None) -> Shard:
    """This rank's items of a run (all of them when alone); `weights` (e.g. images per category)
    balance the ranks' work. Records from `log` on the other ranks end up in rank 0's log."""
    return Shard(items, weights if weights is not None else [1.0] * len(items), log)


# ---------------------------------------------------------------------------------------
# data-parallel training
# ---------------------------------------------------------------------------------------

class ShardedShuffle(Sampler[int]):
    """This rank's share of a seeded shuffle: one permutation per epoch (the generator, seeded by
    the caller per epoch, so it does not depend on how many epochs ran before a resume), padded
    with its first indices to a multiple of the world size, rank r taking positions r, r + W, ...

    The permutation is the one DataLoader(shuffle=True, generator=g) draws (RandomSampler with the
    same generator, after the same draws), so one process sees exactly the order it always did,
    and W processes with per-rank batch B/W see the same global batches as one process with B."""

    def __init__(self, n: int, rank: int, world: int, generator: torch.Generator):
        self.n, self.rank, self.world, self.generator = int(n), int(rank), int(world), generator

    def __len__(self) -> int:
        return math.ceil(self.n / self.world)

    def __iter__(self):
        perm = list(RandomSampler(range(self.n), generator=self.generator))
        total = len(self) * self.world
        perm += (perm * (1 + total // max(self.n, 1)))[: total - len(perm)]
        return iter(perm[self.rank::self.world])


def check_batch_size(batch_size: int) -> int:
    """Per-rank batch of a global batch; the global batch must split evenly."""
    w = world_size()
    if batch_size % w:
        raise ValueError(f"batch size {batch_size} is the global batch and must split evenly over the {w} "
                         f"processes; use a multiple of {w}")
    return batch_size // w


def train_loader(dataset, batch_size: int, workers: int, seed: int, device: torch.device) -> DataLoader:
    """The epoch's loader of this rank: a per-rank batch of batch_size / world, the shuffle seeded
    by `seed` (the caller folds the epoch in)."""
    g = torch.Generator().manual_seed(seed)
    sampler = ShardedShuffle(len(dataset), rank(), world_size(), g)
    # the loader draws its worker base seed from g before the sampler draws the permutation,
    # as DataLoader(shuffle=True, generator=g) does
    return DataLoader(dataset, batch_size=check_batch_size(batch_size), sampler=sampler, generator=g,
                      **loader_options(workers, device))


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with a gradient: every rank's loss depends on every rank's contribution,
    so the gradient of a contribution is the sum of all ranks' incoming gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch of all ranks, for the
    gloo backend (torch's SyncBatchNorm runs on GPUs only). Mean and variance come from two
    differentiable all-reduces (sum, then the sum of squared deviations from the global mean,
    which keeps the variance exact where E[x^2] - E[x]^2 would cancel); their backward
    all-reduces the gradients, so every rank's input gradient is that of the global batch.
    Eval mode, or a single process, is plain BatchNorm on the running statistics."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        self._check_input_dim(x)
        shape = [1, -1] + [1] * (x.dim() - 2)
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)  # (C, local count)
        n = torch.full((1,), float(flat.shape[1]), device=x.device, dtype=x.dtype)
        dist.all_reduce(n)  # global count, kept as a tensor: no host sync
        mean = _SumOverRanks.apply(flat.sum(1)) / n
        var = _SumOverRanks.apply((flat - mean[:, None]).pow(2).sum(1)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1).clamp(min=1))
        y = (x - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def _to_global_bn(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        # the same parameters and buffers (optimizer state and state_dict keys unchanged)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, _to_global_bn(child))
    return module


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm layers normalise with the statistics of the global batch: torch's SyncBatchNorm on
    CUDA, GlobalBatchNorm on CPU. Same parameters, buffers and state_dict keys."""
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_global_bn(module)


class _HeadsLoss(nn.Module):
    """The method's loss as a module whose only registered submodule is the trainable part, so
    DistributedDataParallel syncs and averages the heads' gradients and never touches (broadcasts,
    buckets) the frozen backbones."""

    def __init__(self, method):
        super().__init__()
        self.heads = method.heads
        object.__setattr__(self, "_method", method)  # not a submodule on purpose

    def forward(self, batch, states):
        return self._method.loss(batch, states)


def data_parallel(method, device: torch.device, batch_size: int) -> Callable:
    """The training step's loss function: `method.loss` alone; with several processes the same
    loss through DistributedDataParallel over the heads, BatchNorm synchronised. Checks that the
    global batch splits evenly."""
    check_batch_size(batch_size)
    if not launched():
        return method.loss
    init(device)
    method.heads = sync_batchnorm(method.heads, device)
    device = torch.device(device)
    # the loss uses every head parameter each step (all of FDSL; DCP-SFR builds only what its
    # switches keep), so no search for unused parameters; buffers need no broadcast: with
    # synchronised BatchNorm every rank updates its running statistics identically
    return nn.parallel.DistributedDataParallel(
        _HeadsLoss(method), device_ids=[device] if device.type == "cuda" else None, forward_sync_buffers=False)


def mean_over_ranks(total: torch.Tensor, count: int) -> float:
    """Mean of per-step values summed on the device (`total`) over all ranks' `count` steps: the
    one host sync of an epoch."""
    t = torch.stack([total.to(torch.float64), torch.tensor(float(count), dtype=torch.float64, device=total.device)])
    if launched() and dist.is_initialized():
        dist.all_reduce(t)
    s, n = t.tolist()
    return s / max(n, 1.0)


# ---------------------------------------------------------------------------------------
# launchers: NPROC=N re-executes the command under torchrun
# ---------------------------------------------------------------------------------------

def nproc_from_env() -> int:
    raw = os.environ.get("NPROC", "").strip()
    if not raw:
        return 1
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"environment variable NPROC: expected a number of processes >= 1, got '{raw}'")
    return n


def relaunch_under_torchrun(script: str, args: Sequence[str], device: str) -> None:
    """With NPROC=N > 1 (and not already under torchrun): check that N processes can have a device
    each, then replace this process by `torchrun --standalone --nproc_per_node=N script args`.
    Returns (doing nothing) otherwise."""
    n = nproc_from_env()
    if n == 1 or launched() or "TORCHELASTIC_RUN_ID" in os.environ:
        return
    check_devices(device, n)
    dist_timeout()  # a bad value would stop every process, each with a torchrun traceback
    # torchrun would give each process one thread; share the cores instead (CPU ranks compute)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc_per_node={n}", str(script), *args])

