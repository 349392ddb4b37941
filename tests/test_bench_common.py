"""bench/common.run_bounded: a launcher's deadline holds for its ranks too."""

from __future__ import annotations

import subprocess
import time

import psutil
import pytest

from bench.common import run_bounded

# A launcher that starts a "rank" holding its output pipes, prints the rank's pid, then waits.
LAUNCHER = ["bash", "-c", "sleep {rank_s} & echo $!; sleep {launcher_s}"]


def _cmd(rank_s: int, launcher_s: int) -> list[str]:
    return [a.format(rank_s=rank_s, launcher_s=launcher_s) for a in LAUNCHER]


def _gone(pid: int, within_s: float = 10) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True  # killed; only its parent's wait() is left
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_plain_subprocess_run_leaves_the_ranks_running_past_its_timeout():
    """The premise: subprocess.run kills the launcher at the timeout, not what it started."""
    with pytest.raises(subprocess.TimeoutExpired) as hung:
        subprocess.run(_cmd(120, 120), capture_output=True, text=True, timeout=1)
    rank = psutil.Process(int(hung.value.output.split()[0]))
    try:
        assert not _gone(rank.pid, within_s=2)
    finally:
        rank.kill()


def test_a_hung_launch_is_killed_with_its_ranks_at_the_deadline():
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as hung:
        run_bounded(_cmd(120, 120), timeout=2)
    assert time.monotonic() - t0 < 30
    rank = int(hung.value.output.split()[0])  # the output so far comes with the error
    assert _gone(rank)


def test_a_launch_that_ends_returns_as_subprocess_run_and_leaves_no_rank():
    r = run_bounded(["bash", "-c", "echo out; echo err >&2; exit 3"], timeout=30)
    plain = subprocess.run(["bash", "-c", "echo out; echo err >&2; exit 3"],
                           capture_output=True, text=True)
    assert (r.returncode, r.stdout, r.stderr) == (plain.returncode, plain.stdout, plain.stderr)
    # the launcher ends while its rank still runs with the pipes closed: the rank is killed
    r = run_bounded(["bash", "-c", "sleep 120 >/dev/null 2>&1 & echo $!"], timeout=30)
    assert r.returncode == 0 and _gone(int(r.stdout.split()[0]))
