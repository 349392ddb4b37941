"""Stale DeepSpeed JIT build locks (issue 9): never wait on them silently."""

import subprocess
import sys
import time

import pytest

from ptlm.errors import PtlmError
from ptlm.run.machine import oplocks


@pytest.fixture
def ext(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    (tmp_path / "ext" / "cpu_adam").mkdir(parents=True)
    return tmp_path / "ext"


def test_extensions_root_follows_torch_extensions_dir(ext, monkeypatch):
    assert oplocks.extensions_root() == ext
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    from torch.utils.cpp_extension import _get_build_directory

    assert str(oplocks.extensions_root() / "x") == _get_build_directory("x", False).rstrip("/")


def test_stale_lock_on_a_local_disk_is_removed_and_named(ext, caplog):
    lock = ext / "cpu_adam" / "lock"
    lock.touch()  # what a build killed midway leaves
    assert oplocks.holders(lock) == []
    with caplog.at_level("WARNING", logger="ptlm.run.machine.oplocks"):
        assert oplocks.check_op_locks(poll_s=0.01) == [lock]
    assert not lock.exists()
    assert f"removed {lock}: a stale lock of DeepSpeed op 'cpu_adam'" in caplog.text


def test_unexplained_lock_fails_after_the_bounded_wait(ext, monkeypatch):
    lock = ext / "cpu_adam" / "lock"
    lock.touch()
    monkeypatch.setattr(oplocks, "is_local_fs", lambda path: False)  # e.g. NFS: another node?
    monkeypatch.setenv(oplocks.WAIT_ENV, "0.3")
    t0 = time.monotonic()
    with pytest.raises(PtlmError, match=rf"{lock}: a lock of a DeepSpeed op build.*rm {lock}"):
        oplocks.check_op_locks(poll_s=0.05)
    assert time.monotonic() - t0 < 5 and lock.exists()
    monkeypatch.setenv(oplocks.WAIT_ENV, "soon")
    with pytest.raises(PtlmError, match="PTLM_OPLOCK_WAIT='soon'"):
        oplocks.check_op_locks()


def test_a_live_build_is_waited_for_loudly_and_its_lock_left_alone(ext, caplog):
    lock = ext / "cpu_adam" / "lock"
    builder = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL); "
        "print('held', flush=True); time.sleep(1.5); os.close(fd); os.remove(sys.argv[1])"),
        str(lock)], stdout=subprocess.PIPE, text=True)
    assert builder.stdout.readline().strip() == "held"
    with caplog.at_level("WARNING", logger="ptlm.run.machine.oplocks"):
        assert oplocks.check_op_locks(wait_s=0.1, poll_s=0.05) == []
    assert builder.wait(timeout=10) == 0  # its own remove() found the file: not raced
    assert f"waiting for process(es) {builder.pid} building DeepSpeed op 'cpu_adam'" in caplog.text


def test_fs_type_of_a_path():
    assert oplocks.fs_type(__file__) is not None or not oplocks.Path("/proc/self").exists()


def test_distributed_init_checks_the_locks_before_deepspeed(monkeypatch):
    from ptlm.run.machine import distributed

    def stale(*a, **k):
        raise PtlmError("stale lock")

    monkeypatch.setattr(oplocks, "check_op_locks", stale)
    with pytest.raises(PtlmError, match="stale lock"):
        distributed.init()


# A `ninja` first on PATH that is not the environment's own: it records that it was asked and
# fails. Another ninja version hashes the same build commands differently, so torch's JIT build
# (which runs whatever `ninja` PATH finds) rebuilt every prebuilt op: 290 s for CPU Adam and the
# shared-memory op on the 2-core dev machine with /usr/bin/ninja 1.11.1 against the venv's 1.13.
OTHER_NINJA = """#!/bin/sh
echo "$@" >> "{calls}"
[ "$1" = "--version" ] && echo 1.11.1 && exit 0
exit 1
"""

OPS = ("cpu_adam", "deepspeed_shm_comm")
LOAD_OPS = ("import ptlm.run; from deepspeed.accelerator import get_accelerator; "
            "[get_accelerator().create_op_builder(n).load(verbose=False) "
            "for n in ('CPUAdamBuilder', 'ShareMemCommBuilder')]")


def test_a_process_started_another_way_compiles_nothing(tmp_path):
    """After install (scripts/env.sh prebuilt the ops with the venv's ninja), a process started
    without activating the venv, another ninja first on PATH, loads the ops without compiling:
    ptlm puts its environment's ninja first. The ops are copied to a private
    TORCH_EXTENSIONS_DIR so the shared build folder is not touched."""
    import os
    import shutil

    root = oplocks.extensions_root()
    if not all((root / op / f"{op}.so").exists() for op in OPS):
        pytest.skip(f"the DeepSpeed ops are not prebuilt in {root} (PTLM_PREBUILD_OPS=0?)")
    ext = tmp_path / "ext"
    for op in OPS:
        shutil.copytree(root / op, ext / op, symlinks=True)
    before = {op: (ext / op / ".ninja_log").read_text() for op in OPS}
    other = tmp_path / "other_bin"
    other.mkdir()
    calls = tmp_path / "calls"
    (other / "ninja").write_text(OTHER_NINJA.format(calls=calls))
    (other / "ninja").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env.update(PATH=f"{other}:/usr/bin:/bin", TORCH_EXTENSIONS_DIR=str(ext),
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", LOAD_OPS], env=env, capture_output=True,
                       text=True, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not calls.exists(), f"another ninja was run: {calls.read_text()}"
    assert {op: (ext / op / ".ninja_log").read_text() for op in OPS} == before
