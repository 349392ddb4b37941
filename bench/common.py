"""Helpers shared by the benchmarks: run a command in a fresh process and sample the peak RSS
of its whole process tree (workers included), plus machine facts for the report."""

from __future__ import annotations

import os
import platform
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


def machine() -> str:
    return (f"{platform.node()}: {psutil.cpu_count()} cores ({platform.processor() or platform.machine()}), "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, Python {sys.version.split()[0]}")
