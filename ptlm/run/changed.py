"""Flags that differ, on resume, from those of the run that wrote the checkpoint.

A checkpoint restores the optimizer's param groups (lr, betas, eps, weight decay) and the LR
scheduler's base LRs as they were, so a changed `--lr` used to be silently ignored while
run_config.json recorded it. Now each changed flag is either applied from the resume step on
(stated in the log, metrics.jsonl and the report) or refused before step 1 with the flag to use:

    applied   --lr (the schedule's factors times the new peak), --betas, --eps, --weight-decay,
              --grad-clip (DeepSpeed reads it from this run's config: it was always applied,
              never stated)
    refused   --schedule, --warmup-steps, --warmup-ratio, --min-lr-ratio: the schedule's shape is
              fixed when a run starts and saved in its checkpoints (RunState.schedule); a
              --rewarm-steps segment added by this resume takes --schedule and --min-lr-ratio.
              --packing: what the model saw (documents apart or one stream) is the run's
"""

from __future__ import annotations

import logging

from ptlm.errors import PtlmError

log = logging.getLogger(__name__)

APPLIED = ("lr", "betas", "eps", "weight_decay", "grad_clip")  # RunConfig.optim fields
SHAPE = ("schedule", "warmup_steps", "warmup_ratio", "min_lr_ratio")  # RunConfig.sched fields
SHAPE_OF_A_REWARM = ("schedule", "min_lr_ratio")  # what a new --rewarm-steps segment takes


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def shown(value) -> str:
    """A value as it is typed on the command line (betas: two numbers)."""
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _same(old, new) -> bool:
    if isinstance(new, tuple):
        return old is not None and tuple(old) == new
    return old == new


def check_schedule(cfg, saved: dict, rewarms: bool) -> None:
    """Refuse a resume that asks for another schedule shape than the checkpoint's run planned.
    saved: the checkpoint's run config (RunConfig.to_dict()); rewarms: this resume adds a
    --rewarm-steps segment (which is shaped by --schedule and --min-lr-ratio)."""
    was = saved.get("sched", {})
    for name in SHAPE:
        if name not in was:  # a checkpoint of an older ptlm
            continue
        new, old = getattr(cfg.sched, name), was[name]
        if _same(old, new) or (rewarms and name in SHAPE_OF_A_REWARM):
            continue
        if name == "warmup_ratio" and was.get("warmup_steps") is not None:
            continue  # --warmup-steps decided the warmup; it is compared on its own
        use = (f"give no {flag(name)}" if old is None else f"resume with {flag(name)} "
               f"{shown(old)}")
        raise PtlmError(f"{flag(name)} {shown(new)}: the checkpoint's run used {shown(old)}, and "
                        "a run's LR schedule is fixed when it starts (saved in its checkpoints); "
                        f"{use}, or --resume none to start a new run with this schedule")


def optimizer_changes(cfg, saved: dict, step: int) -> list[dict]:
    """The applied flags whose value differs from the checkpoint's run."""
    was = saved.get("optim", {})
    out = []
    for name in APPLIED:
        new, old = getattr(cfg.optim, name), was.get(name)
        if old is None or _same(old, new):
            continue
        out.append({"option": name, "old": old, "new": list(new) if isinstance(new, tuple)
                    else new, "step": step})
    return out


def apply(changes: list[dict], optimizer, scheduler) -> None:
    """Put the new hyper-parameters in the optimizer's param groups (the checkpoint restored the
    old ones) and the new peak LR in the scheduler's base LRs; the caller re-installs the
    schedule, which sets each group's LR for the next step. --grad-clip needs nothing here."""
    groups = optimizer.param_groups
    for c in changes:
        name, new = c["option"], c["new"]
        if name == "lr":
            scheduler.base_lrs = [new] * len(groups)
            for g in groups:
                g["initial_lr"] = new
        elif name == "betas":
            for g in groups:
                g["betas"] = tuple(new)
        elif name == "eps":
            for g in groups:
                g["eps"] = new
        elif name == "weight_decay":
            # ptlm.model.optim.param_groups puts the decayed matrices first (every model has
            # some); the other group (biases, norms) never decays
            groups[0]["weight_decay"] = new


def describe(c: dict) -> str:
    """For the log: '--lr 0.0001 (the checkpoint's run: 0.003) from step 31 on'."""
    return (f"{flag(c['option'])} {shown(c['new'])} (the checkpoint's run: {shown(c['old'])}) "
            f"from step {c['step'] + 1} on")


def note(changes: list[dict]) -> str:
    """For the report: 'lr 0.003 -> 0.0001 from step 31; ...'."""
    return "; ".join(f"{c['option']} {shown(c['old'])} -> {shown(c['new'])} from step "
                     f"{c['step'] + 1}" for c in changes)


# Checkpoints written before --packing existed trained on blocks as one stream.
PACKING_BEFORE_THE_FLAG = "stream"


def check_packing(cfg, saved: dict) -> None:
    """Refuse a resume with another --packing than the checkpoint's run: half a run with
    documents apart and half as one stream is neither, and its figures compare with nothing."""
    old = saved.get("corpus", {}).get("packing", PACKING_BEFORE_THE_FLAG) if saved else None
    if old is None or old == cfg.corpus.packing:
        return
    raise PtlmError(f"--packing {cfg.corpus.packing}: the checkpoint's run trained with --packing "
                    f"{old}; resume with --packing {old}, or start a new run (another --out, or "
                    "--resume none)")
