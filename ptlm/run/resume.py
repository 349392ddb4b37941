"""Going on from a checkpoint, before the first step of the resumed run:

    resume_source   which checkpoint (--resume auto|PATH); DeepSpeed's universal format when the
                    number of ranks changed under ZeRO-1/2/3
    resume          load it (rank-agreed); with --resume auto, fall back to the next older one
                    that loads; then the checks a changed flag must pass (global batch, packing,
                    schedule), the data position, a backed-off micro-batch, the LR schedule's
                    continuation and the optimizer flags changed on resume
A fresh start (no checkpoint) sets the older history aside and returns False.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ptlm.errors import PtlmError
from ptlm.run import changed, checkpoint, report
from ptlm.run.config import RunConfig
from ptlm.run.machine.distributed import Dist, any_rank, barrier
from ptlm.run.schedule import continue_schedule, install_schedule, rewarms
from ptlm.run.state import Run, RunState
from ptlm.run.step import use_micro_batch

log = logging.getLogger(__name__)


def batch_product(p, world: int) -> str:
    return f"micro-batch {p.micro_batch} x {p.grad_accum} accumulation x {world} rank(s)"


def check_global_batch(run: Run, saved: int) -> None:
    """The data order depends on the global batch: a resume at another one is refused, saying
    how this run's came about (a rounded --global-batch) and which --micro-batch makes the
    checkpoint's on this many ranks."""
    mine, world, asked = run.plan.global_batch, run.dist.world_size, run.cfg.optim.global_batch
    if saved == mine:
        return
    why = (f" (--global-batch {asked} was rounded to {mine}: {batch_product(run.plan, world)})"
           if asked and asked != mine else "")
    if saved % world:
        fix = f"{saved} cannot be split over {world} rank(s): resume on a number that divides it"
    else:
        per = saved // world
        micros = [str(d) for d in range(1, per + 1) if per % d == 0]
        choices = micros[0] if len(micros) == 1 else f"{', '.join(micros[:-1])} or {micros[-1]}"
        fix = f"resume with --global-batch {saved} and --micro-batch {choices}"
    raise PtlmError(f"the checkpoint was trained with global batch {saved}, this run's is "
                    f"{mine}{why}: the data order would change; {fix}")


def resume_source(cfg: RunConfig, dist: Dist, setting) -> tuple[Path | None, bool]:
    """The checkpoint to resume from, and whether it must go through DeepSpeed's universal
    format: ZeRO-1/2/3 partition optimizer states per rank, so a checkpoint written by another
    number of ranks is converted with DeepSpeed's ds_to_universal (DeepSpeed #2898, #5405)."""
    path = checkpoint.resolve(cfg.out, cfg.ckpt.resume)
    if path is None:
        return None, False
    universal = checkpoint.saved_world_size(path) != dist.world_size and setting.zero > 0
    if universal and dist.is_main:
        checkpoint.to_universal(path)
    barrier()
    return path, universal


def resume(run: Run) -> bool:
    """Load the checkpoint chosen by resume_source. One that fails to load (on any rank) is
    an error for --resume PATH; with --resume auto the next older intact one is tried, with a
    warning. Then the run's state, the data position and the LR schedule go on from it."""
    path = run.resume_from
    if path is None:
        _set_aside_history(run, 0)
        return False
    client, error = _load_agreed(run, path)
    if client is None and run.cfg.ckpt.resume != "auto":
        raise PtlmError(f"--resume {path}: the checkpoint does not load ({error}); resume from "
                        "another one, or --resume auto to pick the newest that loads")
    if client is None:
        older = [p for p in checkpoint.candidates(run.cfg.out, "auto")
                 if checkpoint.TAG_RE.match(p.name) and p.name < path.name]
        for candidate in older:
            log.warning("checkpoint %s does not load (%s): falling back to %s", path, error,
                        candidate)
            if run.dist.is_main:
                checkpoint.set_aside(path, error)
            barrier()
            path = candidate
            client, error = _load_agreed(run, path)
            if client is not None:
                break
        if client is None:
            raise PtlmError(f"no checkpoint in {run.cfg.out / checkpoint.CHECKPOINTS} loads (the "
                            f"last one tried, {path}: {error}); give --resume none to start over")
        run.resume_from = path
    run.state = RunState(**client["ptlm"])
    saved_cfg = client.get("config", {})
    changed.check_schedule(run.cfg, saved_cfg, rewarms(run))  # before anything is written
    changed.check_packing(run.cfg, saved_cfg)
    check_global_batch(run, client["loader"]["global_batch"])
    run.loader.load_state_dict(client["loader"])
    _resume_micro_batch(run, lambda engine: checkpoint.load(engine, path, run.dist,
                                                            universal=run.universal))
    continue_schedule(run)
    _apply_changed(run, saved_cfg)
    _set_aside_history(run, run.state.step)
    # Training mode, as the initial eval (skipped on resume) leaves it: from_pretrained returns
    # the model in eval mode, so a resumed run of pretrained weights trained without dropout
    # until its first eval, and its losses differed from the uninterrupted run's.
    run.engine.train()
    if run.dist.is_main:
        _truncate_metrics(run.cfg.out / report.METRICS, run.state.step)
    log.info("resumed from %s%s at step %d (epoch %d, block %d of it)", path,
             " (universal)" if run.universal else "", run.state.step, run.loader.epoch,
             run.loader.consumed)
    return True


def _set_aside_history(run: Run, step: int) -> None:
    """Checkpoints after the resume point (all of them on a fresh start) are another history's:
    moved aside before this run saves its own (checkpoint.set_aside_newer)."""
    if run.dist.is_main:
        metrics = run.cfg.out / report.METRICS if step == 0 else None
        checkpoint.set_aside_newer(run.cfg.out, step, metrics)
    barrier()


def _apply_changed(run: Run, saved_cfg: dict) -> None:
    """New --lr / --betas / --eps / --weight-decay / --grad-clip on resume: applied from the
    resume step on and said so (the checkpoint restored the old values into the optimizer)."""
    changes = changed.optimizer_changes(run.cfg, saved_cfg, run.state.step)
    if not changes:
        return
    sched = run.engine.lr_scheduler
    changed.apply(changes, sched.optimizer, sched)
    install_schedule(run)  # each group's LR for the next step, from the new base LR
    for c in changes:
        log.warning("resume: %s", changed.describe(c))
    run.state.changed = [*run.state.changed, *changes]
    run.metrics.write({"kind": "changed_on_resume", "step": run.state.step, "changes": changes})


def _load_agreed(run: Run, path: Path) -> tuple[dict | None, str | None]:
    """(client state, None), or (None, why) when any rank could not load the checkpoint."""
    universal = checkpoint.saved_world_size(path) != run.dist.world_size and \
        run.plan.setting.zero > 0
    if universal != run.universal:  # the engine was configured for the other format
        return None, "saved by another number of ranks than the checkpoint chosen first"
    if universal and run.dist.is_main:
        checkpoint.to_universal(path)
    barrier()
    error = None
    try:
        client = checkpoint.load(run.engine, path, run.dist, universal=universal)
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file raises anything
        text = str(e).strip().splitlines()
        error = f"{type(e).__name__}: {text[0] if text else ''}".strip()
        client = None
    if any_rank(error is not None, run.dist.device):
        return None, error or "another rank could not load it"
    return client, None


def _resume_micro_batch(run: Run, restore) -> None:
    """A run that had backed off (OOM) goes on at its smaller micro-batch: the engine (built for
    the plan's) is rebuilt for it and the checkpoint loaded again; the loader follows."""
    saved, planned = run.state.micro_batch, run.loader.micro_batch
    per_rank = run.plan.global_batch // run.dist.world_size
    if saved == planned:
        return
    if not 0 < saved < planned or per_rank % saved:  # another number of ranks: the plan's
        run.state.micro_batch = planned
        return
    log.info("the run had backed off to micro-batch %d after running out of memory: going on "
             "with it (planned %d)", saved, planned)
    use_micro_batch(run, saved, restore)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records a killed run wrote after its last checkpoint: the resumed run redoes them."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))

