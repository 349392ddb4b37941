"""Stale JIT build locks of DeepSpeed ops: find them before DeepSpeed waits on them forever.

DeepSpeed compiles its C++ ops (CPU Adam, the CPU shared-memory collectives, ...) on first use
through torch.utils.cpp_extension, which serializes builds with a lock *file*
(TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions/pyXY_ACC/OP/lock): the builder creates it
(O_EXCL), keeps it open while it builds, and removes it at the end. A build killed midway leaves
the file behind, and torch's FileBaton then polls for it to vanish, silently and forever.

`check_op_locks()` runs before DeepSpeed starts (ptlm.run.machine.distributed.init). For each lock file:
  - a process of this host holds it open (found in /proc/PID/fd): a build is running; wait for
    it, saying who builds, every LOG_EVERY_S seconds;
  - no process holds it, on a local file system: provably stale; removed, with a warning (seen
    stale on two polls, so a builder between its close() and remove() is never raced);
  - otherwise (a network file system, where another node may be building, or no /proc): wait
    up to PTLM_OPLOCK_WAIT seconds (default 60), then raise PtlmError naming the file and how to
    clear it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from ptlm.errors import PtlmError

log = logging.getLogger(__name__)

WAIT_ENV = "PTLM_OPLOCK_WAIT"
DEFAULT_WAIT_S = 60.0
POLL_S = 0.5
LOG_EVERY_S = 30.0
# File systems shared between hosts: a lock there may belong to another node's build.
NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "glusterfs",
              "ceph", "cephfs", "9p", "afs", "panfs", "wekafs", "virtiofs", "orangefs", "ocfs2",
              "gfs2"}


def extensions_root() -> Path:
    """The folder holding one build folder per op, as torch.utils.cpp_extension computes it."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        acc = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        acc = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        acc = "cpu"
    py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{py}_{acc}"


def find_locks(root: Path) -> list[Path]:
    return sorted(root.glob("*/lock")) if root.is_dir() else []


def holders(lock: Path) -> list[int] | None:
    """PIDs of this host that hold `lock` open; None when that cannot be known (no /proc)."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    target = os.path.realpath(lock)
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = os.listdir(entry / "fd")
        except OSError:  # gone, or another user's
            continue
        for fd in fds:
            try:
                if os.readlink(entry / "fd" / fd) == target:
                    pids.append(int(entry.name))
                    break
            except OSError:
                continue
    return pids


def fs_type(path: Path) -> str | None:
    """The file system type of `path` (from /proc/self/mountinfo), None when unknown."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    real = os.path.realpath(path)
    best, kind = "", None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mount = fields[4].replace("\\040", " ")
        if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
            best, kind = mount, right.split()[0]
    return kind


def is_local_fs(path: Path) -> bool:
    kind = fs_type(path)
    return kind is not None and kind not in NETWORK_FS and not kind.startswith("fuse")


def wait_seconds() -> float:
    raw = os.environ.get(WAIT_ENV, "")
    if not raw:
        return DEFAULT_WAIT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value < 0:
        raise PtlmError(f"{WAIT_ENV}={raw!r}: expected a number of seconds >= 0")
    return value


def _stale_error(lock: Path, waited: float) -> PtlmError:
    return PtlmError(
        f"{lock}: a lock of a DeepSpeed op build (torch JIT extension '{lock.parent.name}') that "
        f"no process on this host holds, still there after {waited:.0f} s. A build killed "
        "midway leaves it, and DeepSpeed would wait for it forever. If no other node is "
        f"building DeepSpeed ops right now, remove it: rm {lock} (set {WAIT_ENV}=SECONDS to "
        "wait longer for a build on another node)")


def check_op_locks(root: Path | None = None, wait_s: float | None = None,
                   poll_s: float = POLL_S) -> list[Path]:
    """Return once no build lock is left under `root` (default: torch's extensions folder);
    removes provably stale locks (returned), raises PtlmError for one that stays unexplained."""
    root = Path(root) if root is not None else extensions_root()
    wait_s = wait_seconds() if wait_s is None else wait_s
    start = time.monotonic()
    removed: list[Path] = []
    suspects: dict[Path, int] = {}  # lock -> inode, seen unheld once
    last_log: dict[Path, float] = {}
    while locks := find_locks(root):
        now = time.monotonic()
        unexplained = []
        for lock in locks:
            try:
                inode = lock.stat().st_ino
            except FileNotFoundError:  # released meanwhile
                continue
            pids = holders(lock)
            if pids:  # a live build: wait for it, loudly
                suspects.pop(lock, None)
                if now - last_log.get(lock, -LOG_EVERY_S) >= LOG_EVERY_S:
                    log.warning("waiting for process(es) %s building DeepSpeed op '%s' (lock %s)",
                                ", ".join(map(str, pids)), lock.parent.name, lock)
                    last_log[lock] = now
            elif pids is not None and is_local_fs(lock):
                if suspects.get(lock) == inode:
                    try:
                        lock.unlink()
                    except FileNotFoundError:
                        continue
                    removed.append(lock)
                    log.warning("removed %s: a stale lock of DeepSpeed op '%s' (no process "
                                "holds it: a build was killed midway); the op is rebuilt on "
                                "first use", lock, lock.parent.name)
                else:
                    suspects[lock] = inode
            else:
                unexplained.append(lock)
                if lock not in last_log:
                    log.warning("%s: lock of DeepSpeed op '%s' held by no process of this host "
                                "(%s); waiting up to %.0f s for another node's build to end",
                                lock, lock.parent.name, "network file system" if pids is not None
                                else "cannot see other processes", wait_s)
                    last_log[lock] = now
        if unexplained and now - start >= wait_s:
            raise _stale_error(unexplained[0], now - start)
        time.sleep(poll_s)
    return removed


def own_ninja_dir() -> Path | None:
    """The folder of this Python environment's `ninja` (the venv's bin, beside sys.executable,
    or the `ninja` package's), None when it has none."""
    here = Path(sys.executable).parent
    if (here / "ninja").is_file() and os.access(here / "ninja", os.X_OK):
        return here
    try:
        import ninja  # the PyPI package ships the binary

        folder = Path(getattr(ninja, "BIN_DIR", ""))
    except ImportError:
        return None
    return folder if (folder / "ninja").is_file() else None


def use_own_ninja() -> Path | None:
    """Put this environment's ninja first on PATH (for this process and its children).

    torch's JIT build of DeepSpeed's ops runs whatever `ninja` PATH finds, and another ninja
    version hashes the very same build commands differently: every prebuilt op was compiled
    again (CPU Adam and the shared-memory op: 290 s on the 2-core dev machine, 13 min in issue
    19) when ptlm ran without the venv activated (`.venv/bin/python bench/...`) and
    /usr/bin/ninja came first. scripts/env.sh prebuilds with the venv's ninja, so every later
    process uses that one too, however it is started. Returns the folder put first."""
    folder = own_ninja_dir()
    if folder is None:
        return None
    parts = os.environ.get("PATH", "").split(os.pathsep)
    if parts and parts[0] != str(folder):
        os.environ["PATH"] = os.pathsep.join([str(folder), *[p for p in parts
                                                             if p != str(folder)]])
    return folder


def prebuild_ops(names: tuple[str, ...] = ("CPUAdamBuilder",)) -> list[str]:
    """Build (JIT, into torch's extensions folder) the DeepSpeed ops ptlm uses, so that the
    first run does not: called by scripts/env.sh after installing. Returns the ops built."""
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    names = names + (("ShareMemCommBuilder",) if accel.device_name() == "cpu" else ())
    use_own_ninja()
    check_op_locks()
    built = []
    for name in names:
        builder = accel.create_op_builder(name)
        if builder is None or not builder.is_compatible():
            log.warning("DeepSpeed op %s cannot be built here; it is skipped", name)
            continue
        t0 = time.perf_counter()
        builder.load(verbose=False)
        log.info("DeepSpeed op %s ready (%.0f s)", builder.name, time.perf_counter() - t0)
        built.append(builder.name)
    return built

