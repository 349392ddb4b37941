"""One writer per run folder: an exclusive lock on OUT/.ptlm.lock for the run's whole life.

Two runs into one --out would interleave their checkpoints and metrics and both "succeed". Rank 0
takes an exclusive `fcntl.flock` on OUT/.ptlm.lock (never blocking) before anything is written
there and holds it until the run ends; the OS releases it when the process dies, however it dies,
so a killed run never leaves a stale lock. Every rank learns whether rank 0 got it, and all stop
together with a PtlmError if not. The lock file holds who has it (host, pid, time), for the
message the second writer prints.

flock is advisory and per open file: it excludes other ptlm runs, not other programs. On a
network filesystem it works where the filesystem supports flock (NFSv4, Lustre with -o flock);
where it does not, taking it fails and the run says so.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from ptlm.errors import PtlmError

log = logging.getLogger(__name__)

LOCK_FILE = ".ptlm.lock"

_held: dict[Path, int] = {}  # resolved run folder -> open fd holding the lock (this process)


def usable_out(out: Path, what: str = "--out") -> Path:
    """The run folder, created if needed; a PtlmError when it is a file or cannot be written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PtlmError(f"{what} {out} is a file, not a folder: give a folder for the run "
                        "(checkpoints, metrics, report)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PtlmError(f"{what} {out}: cannot create the folder ({e.strerror or e}); give a "
                        "writable folder") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise PtlmError(f"{what} {out} is not writable; give a writable folder")
    return out


def acquire(out: Path) -> Path:
    """Take the run folder's lock for this process (again: a no-op). PtlmError if another
    process holds it, or the folder cannot hold a lock."""
    import fcntl

    out = usable_out(out)
    key = out.resolve()
    if key in _held:
        return key / LOCK_FILE
    path = key / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise PtlmError(f"--out {out}: cannot create the lock file {LOCK_FILE} ({e.strerror or e})"
                        "; give a writable folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise PtlmError(f"--out {out} is in use by another run{holder}: two runs in one folder "
                        "would mix their checkpoints and metrics. Wait for it to finish (or stop "
                        "it), or give another --out") from None
    except OSError as e:
        os.close(fd)
        raise PtlmError(f"--out {out}: cannot lock {LOCK_FILE} ({e.strerror or e}); the "
                        "filesystem may not support flock (mount NFS/Lustre with flock "
                        "support, or use a local folder)") from None
    info = {"host": socket.gethostname(), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _held[key] = fd
    log.debug("locked %s", path)
    return path


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f" (pid {info['pid']} on {info['host']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def release(out: Path) -> None:
    """Let the folder go (the end of a run in a process that goes on, e.g. tests)."""
    fd = _held.pop(Path(out).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor releases the flock


def acquire_for_run(out: Path, dist) -> None:
    """Rank 0 takes the lock; every rank stops with the same error if it could not."""
    error = None
    if dist.is_main:
        try:
            acquire(out)
        except PtlmError as e:
            error = str(e)
    if dist.world_size > 1:
        import torch

        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise PtlmError(error)
