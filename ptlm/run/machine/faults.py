"""Fault injection for tests: the failures a run must survive (an out-of-memory error, a SIGKILL
at a chosen moment), triggered by environment variables so that they never appear in a user's
run config, its saved `run_config.json` or its checkpoints.

    PTLM_FAULT_KILL_AFTER_STEP=N     SIGKILL this process after optimizer step N (and its saves)
    PTLM_FAULT_KILL_AT=POINT[@STEP]  SIGKILL this process when the loop reaches the named point
                                     (e.g. "save:before-complete"), optionally only at that step
    PTLM_FAULT_OOM=STEP[:MICRO[:PHASE]]
                                     raise one torch.OutOfMemoryError on rank 0 in optimizer step
                                     STEP (1-based), micro-step MICRO (1-based, default 1), during
                                     PHASE: forward (default), backward or step

Each fault fires at most once per process. Nothing here runs unless a variable is set.
"""

from __future__ import annotations

import os
import signal

import torch

KILL_AFTER_STEP_ENV = "PTLM_FAULT_KILL_AFTER_STEP"
KILL_AT_ENV = "PTLM_FAULT_KILL_AT"
OOM_ENV = "PTLM_FAULT_OOM"
OOM_PHASES = ("forward", "backward", "step")

_fired: set[str] = set()


def _once(key: str) -> bool:
    if key in _fired:
        return False
    _fired.add(key)
    return True


def kill_after_step(step: int) -> None:
    """Die as a preempted node would, right after optimizer step `step` and its saves."""
    if os.environ.get(KILL_AFTER_STEP_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def kill_at(point: str, step: int | None = None) -> None:
    """Die at a named point of the code (e.g. between two files of a checkpoint)."""
    want = os.environ.get(KILL_AT_ENV)
    if not want:
        return
    name, _, at = want.partition("@")
    if name == point and (not at or (step is not None and int(at) == step)):
        os.kill(os.getpid(), signal.SIGKILL)


def oom_spec() -> tuple[int, int, str] | None:
    raw = os.environ.get(OOM_ENV)
    if not raw:
        return None
    parts = raw.split(":")
    step = int(parts[0])
    micro = int(parts[1]) if len(parts) > 1 and parts[1] else 1
    phase = parts[2] if len(parts) > 2 else "forward"
    if phase not in OOM_PHASES:
        raise ValueError(f"{OOM_ENV}={raw}: phase must be one of {OOM_PHASES}")
    return step, micro, phase


def maybe_oom(step: int, micro: int, phase: str, is_main: bool) -> None:
    """Raise the injected OOM if (step, micro, phase) is the one asked for (rank 0 only, once)."""
    spec = oom_spec()
    if spec and is_main and spec == (step, micro, phase) and _once(OOM_ENV):
        raise torch.OutOfMemoryError(f"injected by {OOM_ENV}={os.environ[OOM_ENV]}")
