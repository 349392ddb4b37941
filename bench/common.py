"""Helpers shared by the benchmarks (and the tests that launch ranks): run a command in a fresh
process and sample the peak RSS of its whole process tree (workers included); run a launcher and
its ranks under a deadline that ends all of them; machine facts for the report."""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PTLM_SHARED", ROOT.parent / "shared"))
SAMPLE_S = 0.02  # RSS sampling period


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd; return wall seconds, peak tree RSS (bytes) and its stdout (last line parsed by
    the caller)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, cwd=ROOT)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps))
        time.sleep(SAMPLE_S)
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"wall_s": time.perf_counter() - t0, "peak_rss": peak, "stdout": out}


def run_bounded(cmd: list[str], timeout: float, **popen) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True, timeout=timeout) for a command that
    starts other processes (a launcher and its ranks), with a timeout that ends all of them.

    subprocess.run's own timeout kills the launcher only: a hung rank goes on running (holding
    its port, its memory and a core) beside whatever runs next. Here the command runs in its own
    process group, killed as a whole at the deadline, and whatever is left of the group when the
    command ends is killed too. A timeout raises subprocess.TimeoutExpired with the output so far
    and, where py-spy is installed, the Python stacks of the group's processes (where they
    hung)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **popen)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stacks = _group_stacks(proc.pid)
        _kill_group(proc.pid)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err + stacks) from None
    finally:
        _kill_group(proc.pid)  # ranks the launcher left behind
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # every process of the group has exited


def _group_stacks(pgid: int) -> str:
    """`py-spy dump` of each process in the group, or "" without py-spy."""
    spy = shutil.which("py-spy")
    if spy is None:
        return ""
    dumps = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) != pgid:
                continue
        except (ProcessLookupError, PermissionError):
            continue
        try:
            r = subprocess.run([spy, "dump", "--pid", str(p.pid)], capture_output=True,
                               text=True, timeout=60)
            dumps.append(f"--- py-spy dump {p.pid}\n{r.stdout}{r.stderr}")
        except subprocess.TimeoutExpired:
            dumps.append(f"--- py-spy dump {p.pid}: no answer in 60 s")
    return "\n".join(["", *dumps])


def machine() -> str:
    return (f"{platform.node()}: {psutil.cpu_count()} cores ({platform.processor() or platform.machine()}), "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, Python {sys.version.split()[0]}")
