"""Ranks, process groups and rank-aware logging.

Works under the `deepspeed` launcher (one or many nodes), under torchrun, and as a plain single
process (`python launch/train.py`): when no launcher set RANK/WORLD_SIZE, we set the single-process
rendezvous ourselves so the same code path (a real DeepSpeed engine) runs everywhere.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass

import torch

LOG_FORMAT = "[%(asctime)s rank {rank}/{world} %(levelname)s %(name)s] %(message)s"


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(local_rank_arg: int | None = None) -> Dist:
    """Initialize torch.distributed through DeepSpeed (nccl on CUDA, gloo on CPU)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:  # plain `python launch/train.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
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
    setup_logging(dist)
    return dist


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


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on any rank (e.g. an OOM seen by one rank)."""
    return all_reduce_sum([float(flag)], device)[0] > 0


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
