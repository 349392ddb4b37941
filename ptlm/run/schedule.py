"""The learning-rate schedule of a run, as data: segment 0 is the schedule the run started with
(transformers' own warmup + cosine / linear / constant functions); a resumed run that goes on past
its planned end stays at the floor, or warms up again (--rewarm-steps) in a new segment. The
segments are saved in checkpoints (RunState.schedule), so a resume computes the very same LRs."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ptlm.errors import PtlmError
from ptlm.run.config import RunConfig
from ptlm.run.state import Run

log = logging.getLogger(__name__)


def total_steps(cfg: RunConfig, steps_per_epoch: int, tokens_per_step: int) -> int:
    candidates = [cfg.sched.epochs * steps_per_epoch]
    if cfg.sched.max_steps:
        candidates.append(cfg.sched.max_steps)
    if cfg.sched.max_tokens:
        candidates.append(math.ceil(cfg.sched.max_tokens / tokens_per_step))
    return min(candidates)


def scheduler_factory(cfg: RunConfig, steps: int):
    """The LR scheduler DeepSpeed builds (given the optimizer) for a run of `steps` steps. A
    resumed run whose length changed goes on with the schedule it started with
    (continue_schedule)."""
    seg = base_segment(cfg, steps)
    return lambda opt: transformers_schedule(opt, seg)


def transformers_schedule(opt, seg: dict):
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_with_min_lr_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    if seg["kind"] == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(opt, seg["warmup"], seg["total"],
                                                           min_lr_rate=seg["min_lr_ratio"])
    if seg["kind"] == "linear":
        return get_linear_schedule_with_warmup(opt, seg["warmup"], seg["total"])
    return get_constant_schedule_with_warmup(opt, seg["warmup"])


def base_segment(cfg: RunConfig, steps: int) -> dict:
    """The schedule this run's flags ask for, as data (saved in checkpoints: RunState.schedule)."""
    s = cfg.sched
    warmup = s.warmup_steps if s.warmup_steps is not None else int(s.warmup_ratio * steps)
    return {"kind": s.schedule, "start": 0, "warmup": warmup, "total": steps,
            "min_lr_ratio": s.min_lr_ratio}


class SegmentedSchedule:
    """LR factor of step k for a schedule that went on past its planned end.

    Segment 0 is the schedule the run started with (transformers' own function, so a resumed
    run computes the very same floats); past its `total` it stays at its floor (cosine: the min
    lr; linear: 0; constant: 1) instead of running on (a cosine past its end would rise again).
    A rewarm segment (--rewarm-steps) starts at step `start` from the factor `from`, rises
    linearly to 1 over `warmup` steps, then decays (cosine / linear) to its floor at `total`."""

    def __init__(self, segments: list[dict]) -> None:
        self.segments = [dict(s) for s in segments]
        self._base = _transformers_lambda(self.segments[0])

    def floor(self, seg: dict) -> float:
        return {"cosine": seg["min_lr_ratio"], "linear": 0.0}.get(seg["kind"], 1.0)

    def __call__(self, k: int) -> float:
        seg = next(s for s in reversed(self.segments) if s["start"] <= k)
        if seg["start"] == 0:
            return self._base(min(k, seg["total"]))
        s, warm = k - seg["start"], seg["warmup"]
        if s < warm:
            return seg["from"] + (1.0 - seg["from"]) * s / warm
        if seg["kind"] == "constant":
            return 1.0
        p = min(1.0, (s - warm) / max(1, seg["total"] - seg["start"] - warm))
        if seg["kind"] == "linear":
            return max(0.0, 1.0 - p)
        r = seg["min_lr_ratio"]
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * p))


def _transformers_lambda(seg: dict):
    return transformers_schedule(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), seg).lr_lambdas[0]


# ------------------------------------------------------------------------------ on resume

def continue_schedule(run: Run) -> None:
    """After loading a checkpoint: the LR schedule goes on as the run planned it when it started,
    even if this run's length differs (more --epochs or --max-steps): past the planned end the LR
    stays at the floor, unless --rewarm-steps N asks for a new warmup and decay to the new end.
    Without this, the schedule would be recomputed for the new length and the LR would jump."""
    s, want = run.state, base_segment(run.cfg, run.total_steps)
    if not s.schedule:  # a checkpoint of an older ptlm: its planned length is unknown
        s.schedule = [want]
        return
    if s.schedule == [want]:
        return  # the very schedule DeepSpeed's engine was built with
    segments, step, last = list(s.schedule), s.step, s.schedule[-1]
    fn = SegmentedSchedule(segments)
    rewarm = run.cfg.sched.rewarm_steps
    lr = run.cfg.optim.lr
    if rewarms(run):
        seg = {"kind": run.cfg.sched.schedule, "start": step, "warmup": rewarm,
               "total": run.total_steps, "min_lr_ratio": run.cfg.sched.min_lr_ratio,
               "from": fn(step)}
        segments.append(seg)
        log.warning("learning rate: the schedule ended at step %d; --rewarm-steps %d: warming up "
                    "again from %.3g to %.3g over steps %d-%d, then %s decay to step %d", step,
                    rewarm, lr * seg["from"], lr, step + 1, step + rewarm, seg["kind"],
                    run.total_steps)
    elif run.total_steps > last["total"]:
        floor = fn.floor(last)
        if floor == 0.0:
            raise PtlmError(f"the run's {last['kind']} schedule ends at step {last['total']} with "
                            f"lr 0: steps {last['total'] + 1}-{run.total_steps} would not train. "
                            "Resume with --rewarm-steps N to warm up again and decay to the new "
                            "end")
        log.warning("learning rate: the run's schedule (set when it started) ends at step %d; "
                    "steps %d-%d go on at its floor lr %.3g instead of re-stretching it. To warm "
                    "up again and decay to the new end, resume with --rewarm-steps N",
                    last["total"], max(step, last["total"]) + 1, run.total_steps, lr * floor)
    elif run.total_steps != last["total"]:
        log.warning("learning rate: going on with the schedule the run started with (%s to step "
                    "%d); this run stops at step %d", last["kind"], last["total"], run.total_steps)
    s.schedule = segments
    install_schedule(run)


def rewarms(run: Run) -> bool:
    """Whether this resume adds a --rewarm-steps segment: the saved schedule has ended and
    the run goes on past it."""
    s = run.state
    last = s.schedule[-1] if s.schedule else base_segment(run.cfg, run.total_steps)
    return bool(run.cfg.sched.rewarm_steps) and s.step >= last["total"] and \
        run.total_steps > s.step


def install_schedule(run: Run) -> None:
    """Make the engine's LR scheduler follow run.state.schedule from run.state.step on (the
    engine was built with the base segment; a checkpoint restores the step, not the function)."""
    fn = SegmentedSchedule(run.state.schedule)
    sched = run.engine.lr_scheduler
    sched.lr_lambdas = [fn] * len(sched.optimizer.param_groups)
    values = [base * fn(run.state.step) for base in sched.base_lrs]
    for group, value in zip(sched.optimizer.param_groups, values):
        group["lr"] = value  # the next step's LR, from the continued schedule
    sched._last_lr = values

