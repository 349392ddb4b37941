"""The training run: `deepspeed launch/train.py ...` (or `python launch/train.py ...`).

    setup (ptlm.run.setup) -> DeepSpeed engine -> [resume] -> eval at step 0
    -> for each optimizer step: `accum` micro-batches through engine(...) / engine.backward,
       engine.step(); log; eval / save when due; at each epoch end: eval + save
    -> export the HF folder -> report.md + loss.png
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ptlm.data.reader import Batch, PackedDataset, PackedLoader
from ptlm.errors import PtlmError
from ptlm.plan.mfu import flops_per_token, mfu, peak_flops
from ptlm.plan.planner import at_micro_batch
from ptlm.run import changed, checkpoint, faults, lock, report
from ptlm.run import setup as runsetup
from ptlm.run.config import RunConfig
from ptlm.run.distributed import Dist, all_reduce_sum, any_rank, barrier, host_sum, init
from ptlm.run.engine import build_engine, gradient_scale
from ptlm.run.export import export_hf
from ptlm.run.evaluate import EvalResult, evaluate_blocks
from ptlm.run.schedule import (
    SegmentedSchedule,
    base_segment,
    scheduler_factory,
    total_steps,
)

log = logging.getLogger(__name__)

EXPORT_DIR = "hf_model"


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


# ------------------------------------------------------------------------------ setup

def _continue_schedule(run: Run) -> None:
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
    if _rewarms(run):
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
    _install_schedule(run)


def _rewarms(run: Run) -> bool:
    """Whether this resume adds a --rewarm-steps segment: the saved schedule has ended and
    the run goes on past it."""
    s = run.state
    last = s.schedule[-1] if s.schedule else base_segment(run.cfg, run.total_steps)
    return bool(run.cfg.sched.rewarm_steps) and s.step >= last["total"] and \
        run.total_steps > s.step


def _install_schedule(run: Run) -> None:
    """Make the engine's LR scheduler follow run.state.schedule from run.state.step on (the
    engine was built with the base segment; a checkpoint restores the step, not the function)."""
    fn = SegmentedSchedule(run.state.schedule)
    sched = run.engine.lr_scheduler
    sched.lr_lambdas = [fn] * len(sched.optimizer.param_groups)
    values = [base * fn(run.state.step) for base in sched.base_lrs]
    for group, value in zip(sched.optimizer.param_groups, values):
        group["lr"] = value  # the next step's LR, from the continued schedule
    sched._last_lr = values


def overfit_blocks(data: PackedDataset, n_docs: int) -> int:
    """Blocks that hold the first n_docs documents of the split."""
    lengths = data.document_lengths()
    return min(len(data), max(1, math.ceil(int(lengths[:n_docs].sum()) / data.seq_len)))


def setup(cfg: RunConfig) -> Run:
    dist = init()
    torch.manual_seed(cfg.corpus.seed)  # the same initial weights on every rank
    packing = cfg.corpus.packing
    train = PackedDataset(cfg.corpus.data, "train", packing=packing)
    val = PackedDataset(cfg.corpus.data, "val", packing=packing)
    train.check_data()  # every shard's sha256 + largest id, before step 1 (PTLM_DATA_CHECK)
    runsetup.check_tokenizer(cfg, train)
    if cfg.corpus.overfit_docs:
        n = overfit_blocks(train, cfg.corpus.overfit_docs)
        train = PackedDataset(cfg.corpus.data, "train", max_blocks=n, packing=packing)
        # can it learn what it saw?
        val = PackedDataset(cfg.corpus.data, "train", max_blocks=n, packing=packing)
        log.info("overfit check: training and evaluating on the first %d documents (%d blocks)",
                 cfg.corpus.overfit_docs, n)
    gpu = runsetup.on_gpu()
    source = runsetup.model_source(cfg.what.model, cfg.what.from_scratch, train)
    p = runsetup.resolve_plan(cfg, source.config, train.seq_len, dist.world_size, gpu)
    setting = p.setting
    loader = PackedLoader(train, setting.micro_batch, world_size=dist.world_size, rank=dist.rank,
                          global_batch=p.global_batch, seed=cfg.corpus.seed)
    steps = total_steps(cfg, loader.steps_per_epoch, p.global_batch * train.seq_len)
    lock.acquire_for_run(cfg.out, dist)  # one writer per run folder, before anything is written
    checkpoint.check_shared(cfg.out, dist)  # before any rank looks for a checkpoint there
    resume_from, universal = _resume_source(cfg, dist, setting)
    # another number of ranks with partitioned optimizer states: DeepSpeed's universal format
    def build(plan):  # also after an OOM back-off, at the new micro-batch
        return build_engine(plan, source, runsetup.optimizer_hyper(cfg), cfg.what.ds_config,
                            lr_scheduler=scheduler_factory(cfg, steps), ds_extra={
                                "checkpoint": {"load_universal": True}} if universal else None,
                            packing=packing)

    built = build(p)
    engine, model, ds_config = built.engine, built.model, built.ds_config
    run_config = cfg.to_dict()
    if cfg.optim.global_batch and p.global_batch != cfg.optim.global_batch:
        _warn_rounded_global_batch(cfg, p, dist)
        run_config["optim"]["global_batch"] = p.global_batch  # the one trained with
        run_config["global_batch_requested"] = cfg.optim.global_batch
    if dist.is_main:
        log.info("plan: %s; micro-batch %d x %d rank(s) x %d accumulation = global batch %d; "
                 "%d steps (%d per epoch)", setting.describe(), p.micro_batch, dist.world_size,
                 p.grad_accum, p.global_batch, steps, loader.steps_per_epoch)
    barrier()
    facts = p.model
    hw = p.hardware
    peak = peak_flops(setting.precision, hw.peak_tflops, hw.fp32_tflops) if gpu else None
    return Run(cfg=cfg, dist=dist, engine=engine, model=model, loader=loader, val=val, plan=p,
               total_steps=steps, metrics=report.MetricsLog(cfg.out, dist.is_main),
               state=RunState(micro_batch=setting.micro_batch), resume_from=resume_from,
               universal=universal, build=build,
               records={"run_config.json": run_config, "plan.json": p.to_dict(),
                        "ds_config.json": ds_config, "engine.json": built.record()},
               flops_per_token=flops_per_token(facts, train.seq_len), peak_flops=peak)


def _batch_product(p, world: int) -> str:
    return f"micro-batch {p.micro_batch} x {p.grad_accum} accumulation x {world} rank(s)"


def _warn_rounded_global_batch(cfg: RunConfig, p, dist: Dist) -> None:
    """The planner rounds a --global-batch that micro-batch x ranks cannot make (its note went
    to plan.json only); a user who resumes with the same flag later deserves to know."""
    if dist.is_main:
        log.warning("--global-batch %d cannot be made from whole micro-batches on %d rank(s): "
                    "training with global batch %d (%s); give --global-batch %d to ask for it, "
                    "or a --micro-batch that divides %s sequences per rank", cfg.optim.global_batch,
                    dist.world_size, p.global_batch, _batch_product(p, dist.world_size),
                    p.global_batch, f"{cfg.optim.global_batch / dist.world_size:g}")


def _check_global_batch(run: Run, saved: int) -> None:
    """The data order depends on the global batch: a resume at another one is refused, saying
    how this run's came about (a rounded --global-batch) and which --micro-batch makes the
    checkpoint's on this many ranks."""
    mine, world, asked = run.plan.global_batch, run.dist.world_size, run.cfg.optim.global_batch
    if saved == mine:
        return
    why = (f" (--global-batch {asked} was rounded to {mine}: {_batch_product(run.plan, world)})"
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


def write_records(run: Run) -> None:
    """run_config.json, plan.json, ds_config.json, engine.json: written once the run is past
    its resume checks, so a refused resume records nothing; run_config.json lists the flags
    changed on resume with the step they apply from (its values are the ones in use now)."""
    if not run.dist.is_main:
        return
    run.cfg.out.mkdir(parents=True, exist_ok=True)
    records = dict(run.records)
    if run.state.changed:
        records["run_config.json"] = {**records["run_config.json"],
                                      "changed_on_resume": run.state.changed}
    for name, data in records.items():
        tmp = run.cfg.out / f".{name}.tmp"
        tmp.write_text(json.dumps(data, indent=2, default=str))
        tmp.replace(run.cfg.out / name)


# ------------------------------------------------------------------------------ pieces

def run_eval(run: Run, tag: str) -> EvalResult:
    run.engine.eval()
    t0 = time.perf_counter()
    res = evaluate_blocks(run.engine, run.val,
                          run.state.micro_batch, rank=run.dist.rank,
                          world_size=run.dist.world_size, device=run.dist.device,
                          max_blocks=run.cfg.eval.eval_max_blocks)
    run.engine.train()
    record = {"kind": "eval", "step": run.state.step, "epoch": run.loader.epoch, "tag": tag,
              "val_loss": res.loss, "val_ppl": res.ppl, "val_tokens": res.tokens,
              "seconds": time.perf_counter() - t0}
    run.metrics.write(record)
    run.state.last_eval = record
    log.info("eval (%s) at step %d: val loss %.4f, ppl %.2f", tag, run.state.step, res.loss,
             res.ppl)
    return res


def save(run: Run) -> None:
    if not run.state.schedule:
        run.state.schedule = [base_segment(run.cfg, run.total_steps)]
    client = {"ptlm": asdict(run.state), "loader": run.loader.state_dict(),
              "config": run.cfg.to_dict(), "plan": run.plan.to_dict()}
    checkpoint.save(run.engine, run.cfg.out, run.state.step, client, run.dist,
                    run.cfg.ckpt.keep_last)
    run.last_save = time.time()


def _resume_source(cfg: RunConfig, dist: Dist, setting) -> tuple[Path | None, bool]:
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
    """Load the checkpoint chosen by _resume_source. One that fails to load (on any rank) is
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
    changed.check_schedule(run.cfg, saved_cfg, _rewarms(run))  # before anything is written
    changed.check_packing(run.cfg, saved_cfg)
    _check_global_batch(run, client["loader"]["global_batch"])
    run.loader.load_state_dict(client["loader"])
    _resume_micro_batch(run, lambda engine: checkpoint.load(engine, path, run.dist,
                                                            universal=run.universal))
    _continue_schedule(run)
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
    _install_schedule(run)  # each group's LR for the next step, from the new base LR
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
    _use_micro_batch(run, saved, restore)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records a killed run wrote after its last checkpoint: the resumed run redoes them."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    import psutil

    return psutil.Process().memory_info().rss


def optimizer_step(run: Run) -> float:
    """One global batch: accum micro-batches, then engine.step(). Returns the mean loss over the
    global batch (all ranks). On an out-of-memory error on any rank, every rank halves its
    micro-batch, doubles accumulation (same global batch, same blocks) and redoes the step from
    the state it started from (see _back_off)."""
    _check_micro_batch(run)
    start = run.loader.consumed
    rng = checkpoint.rng_state()  # a few KB: the redone step draws what the step drew
    while True:
        try:
            return _micro_steps(run)
        except _AgreedOOM:
            pass  # back off outside the handler: its traceback holds the failed step's graph
        _back_off(run, start)
        checkpoint.set_rng_state(rng)


class _AgreedOOM(Exception):
    """Every rank knows some rank ran out of memory in this micro-step."""


def _check_micro_batch(run: Run) -> None:
    """The run's micro-batch, the loader's and the engine's are one (a back-off or a resume of a
    backed-off run changes all three, or the global batch would silently change)."""
    engine_micro = run.engine.train_micro_batch_size_per_gpu()
    if not run.state.micro_batch == run.loader.micro_batch == engine_micro:
        raise PtlmError(f"internal: micro-batch {run.state.micro_batch} (run), "
                        f"{run.loader.micro_batch} (loader), {engine_micro} (engine) disagree")


def _micro_steps(run: Run) -> float:
    """The step's gradient is that of its mean loss per scored token over the whole global
    batch, all ranks and micro-batches together. DeepSpeed averages the micro-steps' losses over
    accumulation and ranks, which equals that only when every micro-batch scores as many tokens;
    with documents apart, a block scores T-1 predictions less one per document start, so each
    micro-step backpropagates its NLL sum times (accumulation x ranks / the step's scored
    tokens), counted on the host before the first forward."""
    accum = run.engine.gradient_accumulation_steps()
    it = iter(run.loader)
    batches = [next(it) for _ in range(accum)]  # host tensors (memory-mapped blocks)
    (scored,) = host_sum([sum(b.predictions() for b in batches)])
    weight = accum * run.dist.world_size / max(scored, 1.0)
    sums = []
    for micro, batch in enumerate(batches, start=1):
        batch = batch.to(run.dist.device, non_blocking=True)
        nll = _agreed(run, lambda: _forward(run, batch, micro))
        _agreed(run, lambda: _backward(run, nll * weight, micro))
        if run.engine.is_gradient_accumulation_boundary():
            if run.plan.setting.zero == 0:
                # ZeRO-0: DeepSpeed does not keep it; fp16 grads still carry the loss scale here
                run.state_grad_norm = grad_norm(run.model) / gradient_scale(run.engine)
            _agreed(run, lambda: _engine_step(run, micro))
        else:
            run.engine.step()  # between boundaries DeepSpeed only counts the micro-step
        sums.append(nll.detach().float())  # no .item() here: it would wait for the GPU
    (total,) = all_reduce_sum([float(torch.stack(sums).sum())],
                              run.dist.device)  # one sync per optimizer step
    return total / max(scored, 1.0)


def _forward(run: Run, batch: Batch, micro: int = 1) -> torch.Tensor:
    _maybe_inject_oom(run, micro, "forward")
    _, nll_sum, _ = run.engine(batch.input_ids, None, batch.positions)
    return nll_sum


def _backward(run: Run, loss: torch.Tensor, micro: int) -> None:
    hook = _maybe_inject_oom(run, micro, "backward")
    try:
        run.engine.backward(loss)
    finally:
        if hook is not None:
            hook.remove()


def _engine_step(run: Run, micro: int) -> None:
    _maybe_inject_oom(run, micro, "step")
    run.engine.step()


def _agreed(run: Run, fn):
    """Run fn; then every rank learns whether any rank ran out of memory in it.

    Ranks agree after the forward, after the backward and after the boundary's engine.step(),
    before the next collective. Ranks usually run out of memory together (same shapes, same
    model); one rank alone running out inside a collective (ZeRO-3's forward gathers, ZeRO-2's
    backward reductions) can still hang the others until the process group's timeout."""
    oom, out = False, None
    try:
        out = fn()
    except torch.OutOfMemoryError:
        oom = True
    if any_rank(oom, run.dist.device):
        raise _AgreedOOM
    return out


def _maybe_inject_oom(run: Run, micro: int, phase: str):
    """Testing aid (ptlm.run.faults, PTLM_FAULT_OOM=STEP:MICRO:PHASE): one OOM in optimizer step
    STEP, micro-step MICRO.

    forward: on rank 0 only, before the forward's first collective (the case of one rank
    running out first). backward: on every rank, from a gradient hook on the model's middle
    parameter, i.e. in the middle of the backward, after part of the gradients were accumulated
    and (ZeRO-2/3) reduced; every rank, because a lone rank leaving a backward halfway leaves the
    others in its reductions. step: on every rank, as engine.step() starts at the boundary.
    Returns the backward hook's handle (the caller removes it), else None."""
    step = run.state.step + 1
    spec = faults.oom_spec()
    if spec is None or spec[:2] != (step, micro) or spec[2] != phase:
        return None
    if phase == "forward":
        faults.maybe_oom(step, micro, phase, run.dist.is_main)
        return None
    if phase == "step":
        faults.maybe_oom(step, micro, phase, True)
        return None
    params = [p for p in run.model.parameters() if p.requires_grad]
    return params[len(params) // 2].register_post_accumulate_grad_hook(
        lambda _p: faults.maybe_oom(step, micro, phase, True))


def _back_off(run: Run, step_start: int) -> None:
    """Halve the micro-batch and put every rank back at the start of the failed step.

    The failed step left DeepSpeed halfway through an accumulation window: partial gradients,
    ZeRO-1/2 buckets, already-reduced flags and accumulated partitions, ZeRO-3 gathered
    parameters and a half-walked backward, the fp16 overflow check. Rather than reset each of
    those by hand per stage and per precision, the engine is rebuilt: the model, optimizer,
    scheduler and loss-scaler states (untouched by a step that never reached the optimizer) go
    through DeepSpeed's own save_checkpoint/load_checkpoint into a fresh engine built for the new
    micro-batch. It costs one checkpoint and one model build, once per back-off. (An OOM inside
    the optimizer update itself could leave it half applied; the injected "step" fault fires
    before the update starts.)"""
    old = run.state.micro_batch
    if old == 1:
        raise PtlmError("out of GPU memory at micro-batch 1: nothing left to halve. Plan again "
                        "for this GPU (`ptlm plan`), e.g. with --checkpointing on, --zero 3 or "
                        "--offload optimizer")
    new = old // 2
    tmp = run.cfg.out / ".oom_backoff"
    _release_zero3(run)
    run.engine.save_checkpoint(str(tmp), tag="step_start", save_latest=False)
    _use_micro_batch(run, new, lambda engine: engine.load_checkpoint(
        str(tmp), tag="step_start", load_optimizer_states=True, load_lr_scheduler_states=True))
    barrier()
    if run.dist.is_main:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    run.loader.consumed = step_start  # redo the same blocks
    log.warning("out of memory at micro-batch %d: every rank now runs micro-batch %d with "
                "accumulation %d (global batch %d unchanged); redoing step %d", old, new,
                run.engine.gradient_accumulation_steps(), run.plan.global_batch,
                run.state.step + 1)
    run.metrics.write({"kind": "oom_backoff", "step": run.state.step, "micro_batch": new,
                       "grad_accum": run.engine.gradient_accumulation_steps()})


def _release_zero3(run: Run) -> None:
    """ZeRO-3: release the parameters a stopped forward/backward left gathered."""
    if run.plan.setting.zero == 3:
        run.engine.optimizer.parameter_offload.get_param_coordinator().release_and_reset_all(
            run.engine.module)


def plan_with_micro_batch(p, micro: int):
    """The plan at another micro-batch, the same global batch (accumulation makes it up), its
    memory and tokens/s evaluated again by the planner for that micro-batch (the plan a
    checkpoint saves)."""
    from dataclasses import replace

    per_rank = p.global_batch // p.hardware.world
    if per_rank % micro:
        raise PtlmError(f"micro-batch {micro} does not divide the {per_rank} sequences per rank")
    job = replace(p.job, global_batch=p.global_batch)  # the global batch trained, not the asked
    chosen = at_micro_batch(p.model, p.hardware, job, p.setting.with_(micro_batch=micro))
    note = (f"micro-batch {micro} (planned {p.micro_batch}) was set by the run: an "
            "out-of-memory back-off, or the resumed checkpoint's")
    return replace(p, chosen=chosen, notes=[*p.notes, note] if micro != p.micro_batch
                   else list(p.notes))


def _use_micro_batch(run: Run, micro: int, restore) -> None:
    """Replace the engine by one built for `micro` (same global batch); restore(engine) fills
    it (load_checkpoint). The old engine is dropped first: its memory is what ran out."""
    import gc

    plan = plan_with_micro_batch(run.plan, micro)
    run.engine = run.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    built = run.build(plan)
    restore(built.engine)
    run.engine, run.model, run.plan = built.engine, built.model, plan
    run.loader.set_micro_batch(micro)
    run.state.micro_batch = micro
    if run.state.schedule and run.state.schedule != [base_segment(run.cfg, run.total_steps)]:
        _install_schedule(run)  # a continued / re-warmed schedule survives the rebuild


def grad_norm(model: nn.Module) -> float:
    """2-norm of all gradients (before clipping), as DeepSpeed's ZeRO optimizers report it;
    summed in fp32: fp16 gradients still carrying the loss scale overflow an fp16 norm."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    # get_total_norm's own foreach kernel, with an fp32 result (it takes no dtype): one launch
    # per step on this hot path, no fp32 copy of the gradients
    return float(torch.linalg.vector_norm(torch.stack(
        torch._foreach_norm(grads, 2, dtype=torch.float32))))


def log_step(run: Run, loss: float, seconds: float, bar) -> None:
    s = run.state
    tokens = run.plan.global_batch * run.val.seq_len
    tps = tokens / max(seconds, 1e-9)
    lr = run.engine.get_lr()[0]
    # ZeRO-0: ptlm's own (fp16's wrapper reports the norm still times the loss scale)
    norm = run.state_grad_norm if run.plan.setting.zero == 0 else run.engine.get_global_grad_norm()
    utilization = (mfu(tps, run.flops_per_token, run.peak_flops, run.dist.world_size)
                   if run.peak_flops else None)
    record = {"kind": "train", "step": s.step, "epoch": run.loader.epoch, "loss": loss,
              "lr": lr, "grad_norm": None if norm is None else float(norm),
              "tokens_per_s": tps, "mfu": utilization, "peak_mem_bytes": peak_memory_bytes(),
              "micro_batch": s.micro_batch, "tokens": s.tokens}
    if s.step % run.cfg.log_every == 0 or s.step == run.total_steps:
        run.metrics.write(record)
    if bar is not None:
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
        bar.update(1)


def end_epoch(run: Run) -> None:
    s = run.state
    res = run_eval(run, "epoch")
    row = {"epoch": run.loader.epoch, "step": s.step,
           "train_loss": s.epoch_loss_sum / max(s.epoch_steps, 1),
           "val_loss": res.loss, "val_ppl": res.ppl, "time_s": s.epoch_seconds}
    s.epochs.append(row)
    run.metrics.write({"kind": "epoch", **row})
    s.epoch_seconds, s.epoch_loss_sum, s.epoch_steps = 0.0, 0.0, 0
    save(run)


def due(every: int, step: int) -> bool:
    return every > 0 and step % every == 0


# ------------------------------------------------------------------------------ the loop

def stop_step(run: Run) -> int:
    """Where this run stops: its last step, or the end of epoch --stop-after-epochs (the
    schedule still planned for all of --epochs, so a later resume goes on as one run)."""
    n = run.cfg.sched.stop_after_epochs
    if n is None:
        return run.total_steps
    stop = min(run.total_steps, n * run.loader.steps_per_epoch)
    if run.dist.is_main and stop < run.total_steps:
        log.info("--stop-after-epochs %d: stopping at step %d, after epoch %d of %d (the LR "
                 "schedule is planned for --epochs %d, %d steps); resume with --epochs %d to go "
                 "on as one run", n, stop, n, run.cfg.sched.epochs, run.cfg.sched.epochs,
                 run.total_steps, run.cfg.sched.epochs)
    return stop


def train_loop(run: Run) -> None:
    from tqdm import tqdm

    s, cfg, loader = run.state, run.cfg, run.loader
    last = stop_step(run)
    bar = tqdm(total=last, initial=min(s.step, last), desc="train", unit="step",
               dynamic_ncols=True) if run.dist.is_main else None
    while s.step < last:
        while s.step < last and loader.consumed < loader.blocks_per_epoch:
            t0 = time.perf_counter()
            loss = optimizer_step(run)
            dt = time.perf_counter() - t0
            s.step += 1
            s.tokens += run.plan.global_batch * run.val.seq_len
            s.train_seconds += dt
            s.epoch_seconds += dt
            s.epoch_loss_sum += loss
            s.epoch_steps += 1
            log_step(run, loss, dt, bar)
            if loader.consumed == loader.blocks_per_epoch:
                break  # end_epoch evaluates and saves
            if due(cfg.eval.eval_every, s.step):
                run_eval(run, "every")
            minutes_due = cfg.ckpt.save_every_minutes > 0 and any_rank(
                time.time() - run.last_save >= 60 * cfg.ckpt.save_every_minutes, run.dist.device)
            if due(cfg.ckpt.save_every, s.step) or minutes_due:
                save(run)
            faults.kill_after_step(s.step)  # testing aid: die as a preempted node would
        if loader.consumed == loader.blocks_per_epoch:
            loader.finish_epoch()
            end_epoch(run)
    if bar is not None:
        bar.close()


def finish(run: Run) -> dict:
    s = run.state
    if not s.epochs or s.epochs[-1]["step"] != s.step:  # stopped mid-epoch (max steps/tokens)
        run_eval(run, "final")
        save(run)
    if run.cfg.ckpt.export:
        if run.plan.setting.zero == 3:  # the last eval's prefetched gathers are still in flight
            run.engine.empty_partition_cache()
        export_hf(run.model, run.cfg.out / EXPORT_DIR, run.val.tokenizer_path, run.dist,
                  run.plan.setting.zero)
    summary = {"run": run_facts(run), "epochs": s.epochs}
    if run.dist.is_main:
        (run.cfg.out / "summary.json").write_text(json.dumps(summary, indent=2))
        records = [json.loads(x) for x in (run.cfg.out / report.METRICS).read_text().splitlines()
                   if x.strip()]
        path = report.write(run.cfg.out, summary, records)
        log.info("report: %s", path)
    run.metrics.close()
    lock.release(run.cfg.out)  # the process may go on (tests); the OS releases it on exit anyway
    return summary


def device_name(dist: Dist) -> str:
    if torch.cuda.is_available():
        return f"{dist.world_size}× {torch.cuda.get_device_name(dist.local_rank)}"
    return f"{dist.world_size}× CPU rank ({os.cpu_count()} cores)"


def run_facts(run: Run) -> dict:
    s = run.state
    epochs_done = len(s.epochs)
    return {
        "model": run.cfg.what.model, "data": str(run.cfg.corpus.data), "seq_len": run.val.seq_len,
        "epochs": epochs_done if epochs_done else f"{s.step}/{run.loader.steps_per_epoch} steps",
        "micro_batch": s.micro_batch, "global_batch": run.plan.global_batch,
        "device": device_name(run.dist), "setting": run.plan.setting.describe(),
        "time_per_epoch_s": (sum(e["time_s"] for e in s.epochs) / epochs_done
                             if epochs_done else None),
        "initial_val_ppl": (s.initial_eval or {}).get("val_ppl"),
        "final_val_ppl": (s.last_eval or {}).get("val_ppl"),
        "steps": s.step, "tokens": s.tokens, "train_seconds": s.train_seconds,
        "notes": {"changed on resume": changed.note(s.changed)} if s.changed else {},
    }


def train(cfg: RunConfig) -> dict:
    run = setup(cfg)
    resumed = resume(run)
    write_records(run)
    if not resumed:
        res = run_eval(run, "initial")
        run.state.initial_eval = {"val_loss": res.loss, "val_ppl": res.ppl, "step": 0}
    train_loop(run)
    return finish(run)
