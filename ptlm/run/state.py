"""The run as data: `Run` (what setup built and the loop uses: config, ranks, engine, data, plan)
and `RunState` (what a checkpoint carries besides DeepSpeed's own state). The step, resume,
schedule and loop modules all read and write these; none of them holds state of its own."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ptlm.data.reader import PackedDataset, PackedLoader
from ptlm.run import report
from ptlm.run.config import RunConfig
from ptlm.run.machine.distributed import Dist


@dataclass
class RunState:
    """What a checkpoint must carry besides DeepSpeed's own state."""

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    epoch_seconds: float = 0.0  # of the epoch in progress
    epoch_loss_sum: float = 0.0  # of the epoch in progress (mean losses of its steps)
    epoch_steps: int = 0
    initial_eval: dict | None = None
    last_eval: dict | None = None
    epochs: list = field(default_factory=list)
    micro_batch: int = 0  # current (an OOM back-off halves it)
    schedule: list = field(default_factory=list)  # LR schedule segments (see lr_segments)
    changed: list = field(default_factory=list)  # flags changed on resume (ptlm.run.changed)


@dataclass
class Run:
    cfg: RunConfig
    dist: Dist
    engine: object
    model: nn.Module
    loader: PackedLoader
    val: PackedDataset
    plan: object
    total_steps: int
    metrics: report.MetricsLog
    state: RunState
    flops_per_token: float
    peak_flops: float | None
    last_save: float = field(default_factory=time.time)
    state_grad_norm: float | None = None  # ZeRO-0 only (ZeRO-1/2/3 report their own)
    resume_from: Path | None = None
    universal: bool = False
    build: object = None  # plan -> ptlm.run.engine.Engine: the engine again (OOM back-off)
    records: dict = field(default_factory=dict)  # file name -> JSON, written once resumed

