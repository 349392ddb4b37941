"""Checkpoints: DeepSpeed's own save/load for model, optimizer and scheduler, plus ptlm's client
state (data position, metrics, config), per-rank RNG states, and a completeness marker.

    RUN/checkpoints/step00000120/            one DeepSpeed tag per checkpoint
        ...DeepSpeed files...
        rng_rank0.pt, rng_rank1.pt            torch / numpy / python / cuda RNG of each rank
        ptlm_complete.json                    written LAST, by rank 0, after every rank finished

A checkpoint without the marker (a run killed mid-write) is never chosen by `latest_complete`.
"""

from __future__ import annotations

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
from ptlm.run.distributed import Dist, all_reduce_sum, barrier

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
COMPLETE = "ptlm_complete.json"
TAG_RE = re.compile(r"^step(\d{8})$")


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
         keep_last: int) -> Path:
    ckpt_dir = Path(run_dir) / CHECKPOINTS
    tag = tag_for(step)
    t0 = time.perf_counter()
    if dist.is_main:  # a leftover incomplete tag of the same step (a killed save) is replaced
        stale = ckpt_dir / tag
        if stale.exists() and not (stale / COMPLETE).exists():
            shutil.rmtree(stale)
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), ckpt_dir / tag / f"rng_rank{dist.rank}.pt")
    barrier()  # every rank's files are on disk before the marker says so
    if dist.is_main:
        marker = {"step": step, "world_size": dist.world_size, "time": time.time()}
        tmp = ckpt_dir / tag / f".{COMPLETE}.tmp"
        tmp.write_text(json.dumps(marker))
        tmp.replace(ckpt_dir / tag / COMPLETE)
        for _, old in complete_tags(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
            shutil.rmtree(universal_path(ckpt_dir / old), ignore_errors=True)
        log.info("saved checkpoint %s in %.1f s", tag, time.perf_counter() - t0)
    barrier()
    return ckpt_dir / tag


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


def resolve(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint folder to resume from: 'auto' (latest complete one in RUN, or none),
    'none', or an explicit checkpoint folder."""
    if resume == "none":
        return None
    if resume == "auto":
        ckpt_dir = Path(run_dir) / CHECKPOINTS
        tag = latest_complete(ckpt_dir)
        return ckpt_dir / tag if tag else None
    path = Path(resume)
    if not (path / COMPLETE).exists():
        raise PtlmError(f"--resume {resume}: not a complete ptlm checkpoint (no {COMPLETE}); "
                        "use --resume auto to pick the latest complete one")
    return path


def saved_world_size(path: Path) -> int:
    return json.loads((path / COMPLETE).read_text())["world_size"]


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
    rng_file = path / f"rng_rank{dist.rank}.pt"
    if rng_file.exists() and not universal:
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        log.warning("no RNG state for rank %d in %s (other number of ranks): dropout masks "
                    "will differ from the original run", dist.rank, path)
    return client_state
