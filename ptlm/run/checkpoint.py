"""Checkpoints: DeepSpeed's own save/load for model, optimizer and scheduler, plus ptlm's client
state (data position, metrics, config), per-rank RNG states, and a completeness marker.

    RUN/checkpoints/step00000120/            one DeepSpeed tag per checkpoint
        ...DeepSpeed files...
        rng_rank0.pt, rng_rank1.pt            torch / numpy / python / cuda RNG of each rank
        ptlm_complete.json                    written LAST, by rank 0, after every rank finished:
                                              step, ranks, and the size of every file

A checkpoint is written under a temporary name (stepNNNNNNNN.partial) and renamed to its tag
only once complete, so a tag folder is either complete or absent; a save killed mid-write leaves
only a .partial folder, removed by the next save. A complete checkpoint is never written again:
a second save of the same step (the periodic save, then the final one) keeps the first.
Resuming checks each file against the sizes in the marker and, with --resume auto, falls back to
the newest checkpoint that is intact and loads (saying so); see docs/reliability.md.
"""

from __future__ import annotations

import errno
import json
import logging
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ptlm.errors import PtlmError
from ptlm.run.machine import faults
from ptlm.run.machine.distributed import Dist, all_reduce_sum, any_rank, barrier

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
COMPLETE = "ptlm_complete.json"
TAG_RE = re.compile(r"^step(\d{8})$")
PARTIAL = ".partial"  # suffix of a checkpoint being written
ABANDONED = ".abandoned"  # suffix of what another history (an older resume point) left
# A write that fails with less than this free is a full disk: torch.save reports ENOSPC as a
# C++ RuntimeError ("unexpected pos ..." from its zip writer), with no errno to go by.
FULL_DISK_FREE = 16 * 2**20
MiB = 2**20


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict:
    """All RNG states as tensors and plain numbers, so `torch.load(weights_only=True)` reads it."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "python": [version, torch.tensor(internal, dtype=torch.int64), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of every complete checkpoint, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        m = TAG_RE.match(p.name)
        if m and (p / COMPLETE).exists():
            out.append((int(m.group(1)), p.name))
    return sorted(out)


def latest_complete(ckpt_dir: Path) -> str | None:
    tags = complete_tags(ckpt_dir)
    return tags[-1][1] if tags else None


def save(engine, run_dir: Path, step: int, client_state: dict, dist: Dist,
         keep_last: int, meta: dict | None = None) -> Path:
    """Write checkpoint `step`: DeepSpeed's files and each rank's RNG into stepNNNNNNNN.partial,
    then (rank 0) the marker with every file's size, then one rename to the tag. A complete
    checkpoint of this step is kept as it is (never rewritten in place). meta: more JSON for
    the marker (what must be read before the engine exists, e.g. the LR schedule)."""
    ckpt_dir = Path(run_dir) / CHECKPOINTS
    tag = tag_for(step)
    final = ckpt_dir / tag
    if (final / COMPLETE).exists():  # every rank sees the same (check_shared, barriers)
        problem = damage(final)
        if problem is None:
            if dist.is_main:
                log.info("checkpoint %s is already complete: kept as it is", tag)
            return final
        barrier()
        if dist.is_main:
            set_aside(final, problem)
    partial = ckpt_dir / f"{tag}{PARTIAL}"
    t0 = time.perf_counter()
    if dist.is_main:  # leftovers of killed saves (the run folder's lock: no other writer)
        for stale in [final, *ckpt_dir.glob(f"step*{PARTIAL}")]:
            if stale.is_dir():
                shutil.rmtree(stale)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    short = _space_short(ckpt_dir, tag) if dist.is_main else None
    if any_rank(short is not None, dist.device):  # rank 0 decides: one folder, one disk
        raise PtlmError(short or f"not enough space in {ckpt_dir} for checkpoint {tag} (rank 0)")
    failed = None
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=partial.name, client_state=client_state,
                               save_latest=False)
        faults.kill_at("save:after-engine", step)
        torch.save(rng_state(), partial / f"rng_rank{dist.rank}.pt")
    except (OSError, RuntimeError) as e:  # every rank must learn it, or the others wait forever
        failed = e
    if any_rank(failed is not None, dist.device):
        raise _save_failed(failed, ckpt_dir, partial, tag) from None
    barrier()  # every rank's files are on disk before the marker says so
    if dist.is_main:
        files = {str(p.relative_to(partial)): p.stat().st_size
                 for p in sorted(partial.rglob("*")) if p.is_file()}
        marker = {"step": step, "world_size": dist.world_size, "time": time.time(),
                  "files": files, **(meta or {})}
        tmp = partial / f".{COMPLETE}.tmp"
        tmp.write_text(json.dumps(marker))
        tmp.replace(partial / COMPLETE)
        faults.kill_at("save:before-rename", step)
        partial.rename(final)  # atomic: the tag appears complete, or not at all
        _fsync_dir(ckpt_dir)
        for _, old in complete_tags(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
            shutil.rmtree(universal_path(ckpt_dir / old), ignore_errors=True)
        log.info("saved checkpoint %s in %.1f s", tag, time.perf_counter() - t0)
    barrier()
    return final


def _aside(path: Path, suffix: str) -> Path:
    """Rename path to NAME<suffix>[-N] (a free name), kept for a look and never chosen again."""
    dest = path.with_name(f"{path.name}{suffix}")
    n = 1
    while dest.exists():
        n += 1
        dest = path.with_name(f"{path.name}{suffix}-{n}")
    path.rename(dest)
    return dest


def size_of(path: Path) -> int:
    """Bytes of a complete checkpoint, from its marker."""
    return sum(marker(path).get("files", {}).values())


def _space_short(ckpt_dir: Path, tag: str) -> str | None:
    """Before a save: why the disk cannot hold it (its free space below the size of the last
    checkpoint, which the new one will match), or None. Rotation (--keep-last) frees the oldest
    only after the new one is complete, so that is no help here."""
    tags = complete_tags(ckpt_dir)
    if not tags:
        return None  # the first save: nothing to go by
    last = ckpt_dir / tags[-1][1]
    try:
        need, free = size_of(last), shutil.disk_usage(ckpt_dir).free
    except (OSError, ValueError):
        return None
    if free >= need:
        return None
    return (f"checkpoint {tag} not saved: {ckpt_dir} has {free / MiB:.1f} MiB free, the last "
            f"checkpoint took {need / MiB:.1f} MiB. Free some space (or lower --keep-last), or "
            f"give --out on a larger disk; then resume with --resume auto (from {last.name}, "
            "complete)")


def _save_failed(error: BaseException | None, ckpt_dir: Path, partial: Path,
                 tag: str) -> Exception:
    """The error for a failed save: one line naming a full disk when it is one (the raw error
    otherwise). The partial folder stays as it is, never chosen (no marker, .partial name); the
    next save removes it."""
    if error is None:  # another rank failed
        return PtlmError(f"checkpoint {tag} not saved: another rank could not write its part "
                         f"in {ckpt_dir} (see its log)")
    try:
        free = shutil.disk_usage(ckpt_dir).free
    except OSError:
        free = None
    full = (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or \
        (free is not None and free < FULL_DISK_FREE)
    if not full:
        return error if isinstance(error, Exception) else RuntimeError(str(error))
    previous = complete_tags(ckpt_dir)
    resume = (f"resume with --resume auto (from {previous[-1][1]}, complete)" if previous
              else "run again (there is no complete checkpoint yet: it starts over)")
    shown = "?" if free is None else f"{free / MiB:.1f}"
    return PtlmError(f"checkpoint {tag} not saved: the disk is full ({ckpt_dir}: {shown} MiB "
                     f"free). The partial checkpoint is left as {partial.name} (never resumed "
                     "from; the next save removes it). Free some space (or lower --keep-last) "
                     f"or give --out on a larger disk, then {resume}")


def set_aside(path: Path, why: str) -> Path:
    """Rename a damaged checkpoint to TAG.damaged[-N] (kept for a look, never chosen again)."""
    dest = _aside(path, ".damaged")
    log.warning("checkpoint %s is damaged (%s): moved to %s", path, why, dest.name)
    return dest


def set_aside_newer(run_dir: Path, step: int, metrics: Path | None = None) -> list[Path]:
    """Checkpoints of RUN after `step` (the resume point; 0: a fresh start) belong to another
    history: the run that wrote them went on from there, this one does not. They are renamed
    TAG.abandoned (not deleted: they may be what the user wants back), so this run's saves of
    those steps write its own and --resume auto never picks them. On a fresh start the old
    metrics file goes aside too (the run would append to it). Rank 0, before the first save."""
    ckpt_dir = Path(run_dir) / CHECKPOINTS
    newer = [tag for s, tag in complete_tags(ckpt_dir) if s > step]
    moved = []
    for tag in newer:
        moved.append(_aside(ckpt_dir / tag, ABANDONED))
        if universal_path(ckpt_dir / tag).exists():
            _aside(universal_path(ckpt_dir / tag), ABANDONED)
    if moved:
        where = f"newer than the resume point (step {step})" if step else \
            "left by an earlier run (this one starts at step 0)"
        log.warning("checkpoints %s in %s are %s: another history's, moved aside to "
                    "TAG%s (kept, never resumed from; delete them when not needed)",
                    ", ".join(newer), ckpt_dir, where, ABANDONED)
    if metrics is not None and metrics.is_file():
        dest = _aside(metrics, ABANDONED)
        log.warning("%s of an earlier run moved aside to %s: this run starts at step 0",
                    metrics.name, dest.name)
        moved.append(dest)
    return moved


def _fsync_dir(path: Path) -> None:
    import os

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def marker(path: Path) -> dict:
    return json.loads((Path(path) / COMPLETE).read_text())


def damage(path: Path) -> str | None:
    """What is wrong with a complete checkpoint's files (None: every file the marker lists is
    there with its size). A marker of an older ptlm lists no files: nothing to compare."""
    try:
        files = marker(path).get("files", {})
    except (OSError, ValueError, AttributeError) as e:
        return f"its {COMPLETE} is unreadable ({e})"
    for name, size in files.items():
        f = Path(path) / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} when it was saved"
    return None


def check_shared(run_dir: Path, dist: Dist, wait_s: float = 10.0) -> None:
    """Every rank must see what rank 0 writes in the run folder: all ranks write their parts of
    every checkpoint into it, and all must find the same checkpoint to resume from."""
    if dist.world_size == 1:
        return
    import uuid

    token = [uuid.uuid4().hex]
    torch.distributed.broadcast_object_list(token, src=0)
    probe = Path(run_dir) / f".ptlm_shared_{token[0]}"
    if dist.is_main:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(token[0])
    barrier()
    deadline = time.time() + wait_s  # a network filesystem may show a new file a moment later
    while not probe.exists() and time.time() < deadline:
        time.sleep(0.5)
    unseen = all_reduce_sum([float(not probe.exists())], dist.device)[0]
    barrier()
    if dist.is_main:
        probe.unlink(missing_ok=True)
    if unseen:
        raise PtlmError(f"--out {run_dir} is not shared: {int(unseen)} rank(s) cannot see the "
                        "files rank 0 writes there. Give --out on a filesystem every node "
                        "mounts at the same path (NFS, Lustre, ...); see docs/multinode.md")


def candidates(run_dir: Path, resume: str) -> list[Path]:
    """The checkpoints to try, in order: 'none' -> []; 'auto' -> every complete and intact
    checkpoint in RUN, newest first (a damaged one is skipped with a warning); an explicit
    folder -> [it], or a PtlmError saying what is wrong with it."""
    if resume == "none":
        return []
    if resume == "auto":
        ckpt_dir = Path(run_dir) / CHECKPOINTS
        tags = complete_tags(ckpt_dir)
        good = []
        for _, tag in reversed(tags):
            problem = damage(ckpt_dir / tag)
            if problem:
                log.warning("checkpoint %s is damaged (%s): skipped", ckpt_dir / tag, problem)
            else:
                good.append(ckpt_dir / tag)
        if tags and not good:
            raise PtlmError(f"no checkpoint in {ckpt_dir} is intact (see the warnings above): "
                            "give --resume none to start over, or --resume PATH")
        if good and good[0].name != tags[-1][1]:
            log.warning("resuming from %s, the newest intact checkpoint", good[0])
        return good
    path = Path(resume)
    if not (path / COMPLETE).exists():
        raise PtlmError(f"--resume {resume}: not a complete ptlm checkpoint (no {COMPLETE}); "
                        "use --resume auto to pick the latest complete one")
    problem = damage(path)
    if problem:
        raise PtlmError(f"--resume {resume}: the checkpoint is damaged ({problem}); resume from "
                        "another one, or --resume auto to pick the newest intact one")
    return [path]


def resolve(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint folder to resume from: 'auto' (the newest complete and intact one in RUN,
    or none), 'none', or an explicit checkpoint folder."""
    found = candidates(run_dir, resume)
    return found[0] if found else None


def saved_world_size(path: Path) -> int:
    return marker(path)["world_size"]


def universal_path(path: Path) -> Path:
    return path.with_name(f"{path.name}_universal")


def to_universal(path: Path) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (its own tool), which loads on
    any number of ranks. Run on one rank; the result sits beside the original."""
    import subprocess
    import sys

    out = universal_path(path)
    if (out / "zero").is_dir():
        return out
    log.info("converting %s to a universal checkpoint (another number of ranks)", path)
    r = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                        "--input_folder", str(path), "--output_folder", str(out),
                        "--inject_missing_state"], capture_output=True, text=True)
    if r.returncode:
        shutil.rmtree(out, ignore_errors=True)
        raise PtlmError(f"DeepSpeed's ds_to_universal could not convert {path}:\n"
                        f"{r.stderr[-2000:]}")
    return out


def load(engine, path: Path, dist: Dist, universal: bool = False) -> dict:
    """Restore engine state (model, optimizer, scheduler) and this rank's RNG; returns the
    client state."""
    source = universal_path(path) if universal else path
    loaded, client_state = engine.load_checkpoint(
        str(source.parent), tag=source.name, load_optimizer_states=True,
        load_lr_scheduler_states=True)
    if loaded is None:
        raise PtlmError(f"DeepSpeed could not load the checkpoint {path}")
    # The RNG files stay in the original folder (a universal conversion writes its own). On
    # another number of ranks, rank r goes on from the saved rank r's generators (not from the
    # run's seed, which would replay the first steps' dropout masks).
    rng_file = path / f"rng_rank{dist.rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        log.warning("no RNG state for rank %d in %s (more ranks than the run that saved it): "
                    "this rank's dropout masks start from the run's seed", dist.rank, path)
    return client_state
