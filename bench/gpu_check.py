"""Every GPU figure of the project in one run: machine, CUDA tests, whole test pipeline speed and
memory per method / precision / mode / k with the FLOP floor, bf16/fp16 map agreement, one
training step per trainable method, torchrun 1 vs N processes. Writes gpu_report.md and
gpu_report.json (every figure, with the targets and a PASS/FAIL mark each) into OUTDIR.

    bash bench/gpu_check.sh OUTDIR              # a CUDA machine; at most --budget seconds (470)
    bash bench/gpu_check.sh --dry-run OUTDIR    # CPU, tiny random backbones, a few images
    bash bench/gpu_check.sh OUTDIR --parts pipeline:fdsl,precision   # rerun some parts

Each part runs in a process of its own (bench/gpu_parts.py) with its own time cap: a part that
fails or outlives its cap is reported with its one-line error (what it measured until then is
kept) and the next part starts. The caps are also cut so that the whole run ends within the
budget, keeping a few seconds for every part still to come. The report files are rewritten
after every part, so a run killed from outside leaves what it had.

The methods timed come from the method registry (methods/__init__.py), each at its own default
backbones and size (methods/configs/<name>.json), random weights (nothing is downloaded).

Exit codes: 0 every part gave its figures (a missed target is a FAIL in the report, not an exit
code); 1 a part or one of its rows failed or was cut off; 2 bad arguments or an output folder
that cannot be written; 3 no usable CUDA GPU (torch missing, or it sees no GPU): one line in the
report, nothing measured; 128 + N stopped by signal N (the running part is killed, the report
says so).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))
from gpu_report import evaluate_targets, render_markdown  # noqa: E402
from utils.io import OutputError, atomic_write_json, atomic_write_text, check_writable  # noqa: E402 - torch-free

KINDS = ("machine", "cuda_tests", "pipeline", "precision", "train", "torchrun")
DEFAULT_BUDGET_S = 470.0  # 8 minutes with room for the start and the report
RESERVE_S = 15.0  # kept for every part still to come when a part's cap is cut to the budget
MIN_CAP_S = 5.0  # a part that would get less is not started
CAPS_S = {"machine": 60, "cuda_tests": 120, "pipeline": 120, "precision": 120, "train": 90, "torchrun": 150}

# What each part measures, at full size (a CUDA GPU) and in the dry run (CPU, tiny backbones)
FULL = {"tiny": False, "image_size": None, "win_size": 13, "win_stride": 2, "shots": [1, 2, 4],
        "precisions": ["bf16", "fp32", "fp16"], "n_test_whole": 128, "n_test_mul": 8, "n_test_precision": 16,
        "batch_size": 8, "workers": 4, "data_size": 256, "eval_size": 240, "matmul_n": 8192, "train_batch": 8,
        "train_steps": 3, "torchrun_method": "knn", "torchrun_n_test": 16}
DRY = {**FULL, "tiny": True, "image_size": 56, "win_size": 2, "win_stride": 2, "shots": [1, 4], "n_test_whole": 4,
       "n_test_mul": 4, "n_test_precision": 4, "batch_size": 4, "workers": 0, "data_size": 64, "eval_size": 32,
       "matmul_n": 256, "train_batch": 2, "train_steps": 1, "torchrun_n_test": 2,
       "threads": 1}  # one CPU thread: no OpenMP barrier stalls on a shared machine

REPORT_JSON, REPORT_MD, LOG = "gpu_report.json", "gpu_report.md", "gpu_check_log.txt"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outdir", help="folder for gpu_report.md, gpu_report.json and gpu_check_log.txt")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny random backbones, a few images (seconds)")
    p.add_argument("--parts", default="", help="comma-separated parts to run (default: all): machine, cuda_tests, "
                   "pipeline (every method) or pipeline:NAME, precision, train, torchrun; machine always runs")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole run "
                   "(default: %(default)s)")
    p.add_argument("--cap", action="append", default=[], metavar="PART=SECONDS",
                   help="time cap of a part (a kind such as pipeline, or one part such as pipeline:knn); repeatable")
    p.add_argument("--inject-fail", action="append", default=[], metavar="PART",
                   help="testing: make this part fail at its start")
    p.add_argument("--inject-hang", action="append", default=[], metavar="PART",
                   help="testing: make this part hang (its cap cuts it off)")
    a = p.parse_args(argv)
    for item in a.parts.split(",") if a.parts else []:
        if item.strip().split(":", 1)[0] not in KINDS:
            p.error(f"--parts: unknown part '{item.strip()}'; known: {', '.join(KINDS)} (or pipeline:METHOD)")
    caps = {}
    for item in a.cap:
        name, sep, value = item.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not sep or name.split(":", 1)[0] not in KINDS or seconds <= 0:
            p.error(f"--cap '{item}': expected PART=SECONDS with PART one of {', '.join(KINDS)} (or pipeline:METHOD) "
                    f"and SECONDS > 0")
        caps[name] = seconds
    a.caps = caps
    if a.budget <= 0:
        p.error(f"--budget must be > 0 seconds, got {a.budget}")
    return a


def wanted(name: str, selection: list[str]) -> bool:
    if name == "machine" or not selection:
        return True
    return any(name == s or name.split(":", 1)[0] == s for s in selection)


def planned_parts(methods: list[str]) -> list[str]:
    return (["cuda_tests"] + [f"pipeline:{m}" for m in methods] + ["precision", "train", "torchrun"])


def cap_of(name: str, caps: dict[str, float]) -> float:
    return float(caps.get(name, caps.get(name.split(":", 1)[0], CAPS_S[name.split(":", 1)[0]])))


class Run:
    """The run's state: parts' results, report files, the log, the budget."""

    def __init__(self, args: argparse.Namespace, argv: list[str]):
        self.args = args
        self.out = Path(args.outdir)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget
        self.settings = DRY if args.dry_run else FULL
        self.device = "cpu" if args.dry_run else "cuda:0"
        self.parts: dict[str, dict] = {}
        self.report = {"schema": 1, "command": "bash bench/gpu_check.sh " + " ".join(shlex.quote(a) for a in argv),
                       "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "dry_run": bool(args.dry_run), "device": self.device, "budget_s": args.budget,
                       "settings": self.settings, "parts": self.parts}
        self.tmp = tempfile.TemporaryDirectory(prefix="gpu_check_")
        self.log = open(self.out / LOG, "w", encoding="utf-8")
        self.peaks: dict[str, float] = {}
        self.current: subprocess.Popen | None = None

    def kill_current(self) -> None:
        if self.current is not None and self.current.poll() is None:
            try:
                os.killpg(self.current.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.current.wait(timeout=30)  # reaped: no zombie left behind
            except subprocess.TimeoutExpired:
                pass

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def write(self, exit_code: int | None = None) -> None:
        self.report["seconds"] = self.elapsed()
        self.report["targets"] = evaluate_targets(self.parts)
        if exit_code is not None:
            self.report["exit_code"] = exit_code
        atomic_write_json(self.out / REPORT_JSON, self.report)
        atomic_write_text(self.out / REPORT_MD, render_markdown(self.report))

    def say(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {text}", flush=True)

    def run_part(self, name: str, remaining_after: int) -> dict:
        cap = cap_of(name, self.args.caps)
        left = self.deadline - time.monotonic() - RESERVE_S * remaining_after
        cap_eff = min(cap, left)
        if cap_eff < MIN_CAP_S:
            part = {"status": "not run", "seconds": 0.0, "cap_s": cap, "error": "the run's time budget was spent",
                    "figures": {}, "rows": [], "notes": []}
            self.parts[name] = part
            self.write()
            self.say(f"{name}: not run (budget spent)")
            return part
        safe = name.replace(":", "_")
        spec_path = Path(self.tmp.name) / f"{safe}.spec.json"
        result = Path(self.tmp.name) / f"{safe}.result.json"
        inject = "hang" if name in self.args.inject_hang else "fail" if name in self.args.inject_fail else None
        spec = {"part": name, "result": str(result), "device": self.device, "settings": self.settings,
                "peaks": self.peaks, "inject": inject}
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        self.parts[name] = {"status": "running", "seconds": None, "cap_s": cap_eff, "figures": {}, "rows": [],
                            "notes": []}
        self.write()
        self.say(f"{name}: started (cap {cap_eff:.0f} s)")
        self.log.write(f"\n===== {name} (cap {cap_eff:.0f} s) =====\n")
        self.log.flush()
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        if self.device == "cpu":  # freed tensors leave the resident set: CPU peak memory means something
            env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # (bench_lfe.py); CUDA has its own counters
        env["PYTHONUNBUFFERED"] = "1"
        env["TQDM_DISABLE"] = "1"  # progress bars would fill the log
        t = time.monotonic()
        # its own process group (same session: whoever stops this run's session stops it too), so a
        # part and everything it started (pytest, torchrun ranks, DataLoader workers) stop together
        proc = subprocess.Popen([sys.executable, str(BENCH / "gpu_parts.py"), str(spec_path)], cwd=REPO,
                                stdout=self.log, stderr=subprocess.STDOUT, env=env, preexec_fn=os.setpgrp)
        self.current = proc
        self.parts[name]["pid"] = proc.pid
        self.write()
        timed_out = False
        try:
            rc = proc.wait(timeout=cap_eff)
        except subprocess.TimeoutExpired:
            timed_out = True
            self.kill_current()
            rc = proc.wait()
        finally:
            self.current = None
        seconds = time.monotonic() - t
        self.log.flush()
        part = self._collect(name, result, rc, timed_out, seconds, cap_eff)
        self.parts[name] = part
        self.write()
        self.say(f"{name}: {part['status']} in {seconds:.1f} s" + (f" - {part['error']}" if part.get("error") else ""))
        return part

    def _collect(self, name: str, result: Path, rc: int, timed_out: bool, seconds: float, cap: float) -> dict:
        try:
            data = json.loads(result.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        part = {"status": "ok", "seconds": seconds, "cap_s": cap, "figures": data.get("figures", {}),
                "rows": data.get("rows", []), "notes": data.get("notes", [])}
        if timed_out:
            part.update(status="timeout", error=f"cut off at its {cap:.0f} s cap"
                        + (f" (rows kept: {len(part['rows'])})" if part["rows"] else ""))
        elif data.get("error") or rc != 0:
            part.update(status="failed", error=data.get("error") or f"exit code {rc}: {self._last_log_line()}")
            if data.get("traceback"):
                part["traceback"] = data["traceback"]
        elif data.get("skipped"):
            part.update(status="skipped", reason=data["skipped"])
            part["notes"] = [f"skipped: {data['skipped']}"] + part["notes"]
        else:
            errors = [r for r in part["rows"] if "error" in r]
            if errors:
                part.update(status="partial", error=f"{len(errors)} row(s) failed, first: {errors[0]['error']}")
        return part

    def _last_log_line(self) -> str:
        try:
            lines = [x for x in (self.out / LOG).read_text(encoding="utf-8", errors="replace").splitlines()
                     if x.strip()]
        except OSError:
            return "no output"
        return lines[-1][:300] if lines else "no output"


def no_cuda_line(machine: dict) -> str | None:
    """The one line that stops a GPU run, or None when it can go on."""
    if machine["status"] not in ("ok", "partial"):
        return f"the machine check did not finish ({machine['status']}: {machine.get('error')}): nothing measured"
    f = machine["figures"]
    if not f.get("cuda_available"):
        return (f"torch {f.get('torch', '?')} (CUDA build: {f.get('torch_cuda', '?')}) sees no CUDA GPU "
                f"(torch.cuda.is_available() is False): nothing measured")
    return None


def run_check(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        check_writable(args.outdir, "report folder")
        Path(args.outdir).mkdir(parents=True, exist_ok=True)
    except (OutputError, OSError) as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return 2
    run = Run(args, argv)
    selection = [s.strip() for s in args.parts.split(",") if s.strip()]

    def stopped(signum, frame):  # Ctrl-C or a kill from outside: no part is left running
        run.kill_current()
        name = signal.Signals(signum).name
        for part in run.parts.values():
            if part["status"] == "running":
                part.update(status="failed", error=f"the run was stopped ({name})")
        run.report["stopped"] = f"stopped by {name} after {run.elapsed():.0f} s"
        run.write(exit_code=128 + signum)
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stopped)
    try:
        machine = run.run_part("machine", remaining_after=len(KINDS))
        stop = None if args.dry_run else no_cuda_line(machine)
        methods = [m["name"] for m in machine["figures"].get("methods", [])]
        names = [n for n in planned_parts(methods) if wanted(n, selection)]
        unknown = [s for s in selection if s.startswith("pipeline:") and s not in names]
        if stop is None and machine["status"] not in ("ok", "partial"):
            stop = f"the machine check failed ({machine.get('error')}): nothing else can run"
        if stop is not None:
            run.report["stopped"] = stop
            for n in names:
                run.parts[n] = {"status": "not run", "seconds": 0.0, "cap_s": None, "error": stop, "figures": {},
                                "rows": [], "notes": []}
            run.write(exit_code=3)
            run.say(stop)
            return 3
        run.peaks.update({k: v * 1e12 for k, v in machine["figures"].get("matmul_tflops", {}).items()})
        for u in unknown:
            run.parts[u] = {"status": "failed", "seconds": 0.0, "cap_s": None, "figures": {}, "rows": [], "notes": [],
                            "error": f"no method '{u.split(':', 1)[1]}' in the registry (known: {', '.join(methods)})"}
        for i, name in enumerate(names):
            run.run_part(name, remaining_after=len(names) - i - 1)
        bad = [n for n, p in run.parts.items() if p["status"] not in ("ok", "skipped")]
        code = 1 if bad else 0
        run.write(exit_code=code)
        for t in run.report["targets"]:
            run.say(f"target {t['result']:4} {t['subject']}: {t['figure']} = "
                    f"{'-' if t['value'] is None else format(t['value'], '.4g')} (goal {t['goal']})")
        run.say(f"report: {run.out / REPORT_MD} (exit code {code}" + (f"; not ok: {', '.join(bad)})" if bad else ")"))
        return code
    finally:
        run.log.close()
        run.tmp.cleanup()


def main(argv=None) -> int:
    try:
        return run_check(argv)
    finally:
        carried = os.environ.get("GPU_CHECK_REMOVE_AT_EXIT", "")  # gpu_check.sh's folder of installed wheels
        if Path(carried).name.startswith("gpu_check_site."):
            shutil.rmtree(carried, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
