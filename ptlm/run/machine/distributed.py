"""Ranks, process groups and rank-aware logging.

Works under the `deepspeed` launcher (one or many nodes), under torchrun, and as a plain single
process (`python launch/train.py`): when no launcher set RANK/WORLD_SIZE, we set the single-process
rendezvous ourselves so the same code path (a real DeepSpeed engine) runs everywhere.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import socket
import sys
from dataclasses import dataclass

import torch

from ptlm.errors import PtlmError
from ptlm.run.machine import oplocks

LOG_FORMAT = "[%(asctime)s rank {rank}/{world} %(levelname)s %(name)s] %(message)s"
# DeepSpeed's CPU backend gives each rank a POSIX shared-memory segment of ~66 MiB when every rank
# is on this host (LOCAL_SIZE == world size; ops/csrc/cpu/comm/shm.cpp, shm_initialize) and never
# unlinks it: each CPU run left 66 MiB of RAM per rank behind in /dev/shm (a tmpfs).
SHM_DIR = "/dev/shm"
SHM_SEGMENT = "deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A free TCP port on this host (single-process rendezvous, tests, benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _under_mpi() -> bool:
    return any(k in os.environ for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"))


def _ranks_from_mpi_or_srun() -> None:
    """`deepspeed --launcher openmpi` (mpirun) and `--launcher slurm` (srun) start this script
    on every rank themselves, without RANK/WORLD_SIZE: take them from Open MPI's or Slurm's
    variables. MASTER_ADDR/MASTER_PORT must come from the user (.deepspeed_env, sbatch script);
    under mpirun without them DeepSpeed's own MPI discovery (mpi4py) takes over."""
    env = os.environ
    if "OMPI_COMM_WORLD_RANK" in env:
        rank, size = env["OMPI_COMM_WORLD_RANK"], env["OMPI_COMM_WORLD_SIZE"]
        local_rank = env["OMPI_COMM_WORLD_LOCAL_RANK"]
        local_size = env["OMPI_COMM_WORLD_LOCAL_SIZE"]
    elif "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        rank, size = env["SLURM_PROCID"], env["SLURM_STEP_NUM_TASKS"]
        local_rank = env["SLURM_LOCALID"]
        per_node = re.match(r"\d+", env.get("SLURM_STEP_TASKS_PER_NODE", ""))  # "8(x2)"
        local_size = per_node.group(0) if per_node else size
    else:
        return
    if "MASTER_ADDR" not in env:
        if _under_mpi():
            return  # DeepSpeed's MPI discovery (mpi4py) finds rank 0's address
        raise PtlmError("started by srun without MASTER_ADDR: export MASTER_ADDR=$(scontrol "
                        "show hostnames \"$SLURM_JOB_NODELIST\" | head -n1) and MASTER_PORT "
                        "before srun (see docs/multinode.md)")
    env.setdefault("MASTER_PORT", "29500")
    env.update(RANK=rank, WORLD_SIZE=size, LOCAL_RANK=local_rank, LOCAL_WORLD_SIZE=local_size)


def init(local_rank_arg: int | None = None) -> Dist:
    """Initialize torch.distributed through DeepSpeed (nccl on CUDA, gloo on CPU)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    oplocks.check_op_locks()  # a killed op build's lock would make DeepSpeed wait forever, silently
    if "RANK" not in os.environ:
        _ranks_from_mpi_or_srun()
    if "RANK" not in os.environ and not _under_mpi():  # plain `python launch/train.py`
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_arg or 0))
    accel = get_accelerator()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=accel.communication_backend_name())
    if accel.device_name() == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(accel.device_name())
    dist = Dist(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
                local_rank=local_rank, device=device)
    if accel.device_name() == "cpu":
        _unlink_shm_segment(dist)
    setup_logging(dist)
    return dist


def _unlink_shm_segment(dist: Dist) -> None:
    """Remove the name of this rank's DeepSpeed shared-memory segment (see SHM_SEGMENT).

    shm_initialize returns only after this rank has mapped every peer's segment, so after a
    barrier no rank needs a name any more: the mappings stay valid, and the kernel frees the
    memory when the last process that maps it exits, however the run ends. The condition is
    the same on every rank (the barrier is collective)."""
    env = os.environ
    if env.get("LOCAL_SIZE") != str(dist.world_size) or not os.path.isdir(SHM_DIR):
        return
    torch.distributed.barrier()
    name = SHM_SEGMENT.format(uid=os.getuid(), addr=env.get("MASTER_ADDR", ""),
                              port=env.get("MASTER_PORT", ""), rank=dist.rank)
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


def setup_logging(dist: Dist, level: int = logging.INFO) -> None:
    """Every log line carries its rank; ranks other than 0 log warnings and errors only."""
    fmt = LOG_FORMAT.format(rank=dist.rank, world=dist.world_size)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    root = logging.getLogger("ptlm")
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(level if dist.is_main else logging.WARNING)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over all ranks (fp64, one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


@functools.cache
def _control_group():
    """A gloo group for small host-side agreements: a CPU all-reduce there does not wait for the
    GPU's queued kernels, unlike a .item() on a device tensor (created collectively, on first use
    by every rank at the same point)."""
    return torch.distributed.new_group(backend="gloo")


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank if it is True on any rank (e.g. an OOM seen by one rank).
    Host-side only: it never synchronizes the GPU."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return flag
    t = torch.tensor([float(flag)])
    torch.distributed.all_reduce(t, group=_control_group())
    return t.item() > 0


def decided_by_rank0(decide, what: str):
    """decide() on rank 0 only; every rank gets its value (broadcast_object_list on the default
    group), so a decision every rank must agree on is made once. An error on rank 0 is raised on
    every rank, so none waits forever. what: the decision, for the other ranks' error."""
    dist = torch.distributed
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return decide()
    box: list = [None]
    error = None
    if dist.get_rank() == 0:
        try:
            box = [("value", decide())]
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks know
            error = e
            box = [("error", f"{type(e).__name__}: {e}" if not isinstance(e, PtlmError)
                    else str(e))]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    kind, value = box[0]
    if kind == "error":
        raise PtlmError(f"rank 0 could not {what}: {value}")
    return value


def host_sum(values: list[float]) -> list[float]:
    """Sum a few host-side numbers over all ranks on the gloo control group: it never waits for
    the GPU's queued kernels (all_reduce_sum on a CUDA device does)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t, group=_control_group())
    return t.tolist()


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def shutdown(clean: bool = True) -> None:
    """Tear the process groups down before the interpreter exits.

    Left to interpreter exit, gloo's (and NCCL's) worker threads can be destroyed in whatever
    order the C++ statics go, which ends some runs with "terminate called without an active
    exception" (exit 250 / SIGABRT) after a successful run. clean=True first waits for every
    rank (nobody tears down while a peer still talks to it); on an error path (clean=False) a
    barrier could hang on a rank that already died, so the groups are just destroyed locally."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    try:
        if clean:
            torch.distributed.barrier()
    finally:
        _control_group.cache_clear()
        torch.distributed.destroy_process_group()
