"""The training run: `deepspeed launch/train.py ...` (or `python launch/train.py ...`).

    setup (ptlm.runsetup) -> DeepSpeed engine -> [resume] -> eval at step 0
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

from ptlm.data.reader import PackedDataset, PackedLoader
from ptlm.errors import PtlmError
from ptlm.model.loss import LossModule
from ptlm.run import checkpoint, faults, report
from ptlm.run import setup as runsetup
from ptlm.run.config import RunConfig
from ptlm.run.distributed import Dist, all_reduce_sum, any_rank, barrier, init
from ptlm.run.evaluate import EvalResult, evaluate_blocks

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


# ------------------------------------------------------------------------------ setup

def total_steps(cfg: RunConfig, steps_per_epoch: int, tokens_per_step: int) -> int:
    candidates = [cfg.epochs * steps_per_epoch]
    if cfg.max_steps:
        candidates.append(cfg.max_steps)
    if cfg.max_tokens:
        candidates.append(math.ceil(cfg.max_tokens / tokens_per_step))
    return min(candidates)


def scheduler_factory(cfg: RunConfig, steps: int):
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_with_min_lr_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * steps)
    if cfg.schedule == "cosine":
        return lambda opt: get_cosine_with_min_lr_schedule_with_warmup(
            opt, warmup, steps, min_lr_rate=cfg.min_lr_ratio)
    if cfg.schedule == "linear":
        return lambda opt: get_linear_schedule_with_warmup(opt, warmup, steps)
    return lambda opt: get_constant_schedule_with_warmup(opt, warmup)


def overfit_blocks(data: PackedDataset, n_docs: int) -> int:
    """Blocks that hold the first n_docs documents of the split."""
    lengths = data.document_lengths()
    return min(len(data), max(1, math.ceil(int(lengths[:n_docs].sum()) / data.seq_len)))


def setup(cfg: RunConfig) -> Run:
    import deepspeed

    from ptlm.model.load import enable_checkpointing
    from ptlm.model.optim import build_optimizer
    from ptlm.plan.planner import flops_per_token

    dist = init()
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    train = PackedDataset(cfg.data, "train")
    val = PackedDataset(cfg.data, "val")
    runsetup.check_tokenizer(cfg, train)
    if cfg.overfit_docs:
        n = overfit_blocks(train, cfg.overfit_docs)
        train = PackedDataset(cfg.data, "train", max_blocks=n)
        val = PackedDataset(cfg.data, "train", max_blocks=n)  # can it learn what it saw?
        log.info("overfit check: training and evaluating on the first %d documents (%d blocks)",
                 cfg.overfit_docs, n)
    gpu = runsetup.on_gpu()
    config = runsetup.checked_config(cfg, train)
    p = runsetup.resolve_plan(cfg, config, train.seq_len, dist.world_size, gpu)
    setting = p.setting
    ds_config, hyper = runsetup.deepspeed_config(cfg, p)
    model = runsetup.build_model(cfg, config, train, setting.precision, ds_config)
    if setting.checkpointing:
        enable_checkpointing(model)
    loader = PackedLoader(train, setting.micro_batch, world_size=dist.world_size, rank=dist.rank,
                          global_batch=p.global_batch, seed=cfg.seed)
    steps = total_steps(cfg, loader.steps_per_epoch, p.global_batch * train.seq_len)
    checkpoint.check_shared(cfg.out, dist)  # before any rank looks for a checkpoint there
    resume_from, universal = _resume_source(cfg, dist, setting)
    if universal:  # another number of ranks with partitioned optimizer states
        ds_config["checkpoint"] = {"load_universal": True}
    optimizer = build_optimizer(setting, model.named_parameters(), **hyper)
    if optimizer is None:  # DeepSpeed builds CPU Adam from the config
        ds_config["optimizer"] = {"type": "AdamW", "params": {**hyper, "betas": list(
            hyper["betas"])}}
    engine, _, _, _ = deepspeed.initialize(model=LossModule(model, setting.chunked_loss),
                                           optimizer=optimizer, config=ds_config,
                                           lr_scheduler=scheduler_factory(cfg, steps))
    if dist.is_main:
        cfg.out.mkdir(parents=True, exist_ok=True)
        for name, data in (("run_config.json", cfg.to_dict()), ("plan.json", p.to_dict()),
                           ("ds_config.json", ds_config)):
            (cfg.out / name).write_text(json.dumps(data, indent=2, default=str))
        log.info("plan: %s; micro-batch %d x %d rank(s) x %d accumulation = global batch %d; "
                 "%d steps (%d per epoch)", setting.describe(), p.micro_batch, dist.world_size,
                 p.grad_accum, p.global_batch, steps, loader.steps_per_epoch)
    barrier()
    facts = p.model
    hw = p.hardware
    peak = None
    if gpu:
        tflops = hw.fp32_tflops if setting.precision == "fp32" else hw.peak_tflops
        peak = tflops * 1e12
    return Run(cfg=cfg, dist=dist, engine=engine, model=model, loader=loader, val=val, plan=p,
               total_steps=steps, metrics=report.MetricsLog(cfg.out, dist.is_main),
               state=RunState(micro_batch=setting.micro_batch), resume_from=resume_from,
               universal=universal,
               flops_per_token=flops_per_token(facts, train.seq_len), peak_flops=peak)


# ------------------------------------------------------------------------------ pieces

def run_eval(run: Run, tag: str) -> EvalResult:
    run.engine.eval()
    t0 = time.perf_counter()
    res = evaluate_blocks(lambda ids, labels: run.engine(ids, labels), run.val,
                          run.state.micro_batch, rank=run.dist.rank,
                          world_size=run.dist.world_size, device=run.dist.device,
                          max_blocks=run.cfg.eval_max_blocks)
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
    client = {"ptlm": asdict(run.state), "loader": run.loader.state_dict(),
              "config": run.cfg.to_dict(), "plan": run.plan.to_dict()}
    checkpoint.save(run.engine, run.cfg.out, run.state.step, client, run.dist,
                    run.cfg.keep_last)
    run.last_save = time.time()


def _resume_source(cfg: RunConfig, dist: Dist, setting) -> tuple[Path | None, bool]:
    """The checkpoint to resume from, and whether it must go through DeepSpeed's universal
    format: ZeRO-1/2/3 partition optimizer states per rank, so a checkpoint written by another
    number of ranks is converted with DeepSpeed's ds_to_universal (DeepSpeed #2898, #5405)."""
    path = checkpoint.resolve(cfg.out, cfg.resume)
    if path is None:
        return None, False
    universal = checkpoint.saved_world_size(path) != dist.world_size and setting.zero > 0
    if universal and dist.is_main:
        checkpoint.to_universal(path)
    barrier()
    return path, universal


def resume(run: Run) -> bool:
    path = run.resume_from
    if path is None:
        return False
    client = checkpoint.load(run.engine, path, run.dist, universal=run.universal)
    run.state = RunState(**client["ptlm"])
    run.loader.load_state_dict(client["loader"])
    if run.dist.is_main:
        _truncate_metrics(run.cfg.out / report.METRICS, run.state.step)
    log.info("resumed from %s%s at step %d (epoch %d, block %d of it)", path,
             " (universal)" if run.universal else "", run.state.step, run.loader.epoch,
             run.loader.consumed)
    return True


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
    micro-batch, doubles accumulation (same global batch, same blocks) and redoes the step."""
    start = run.loader.consumed
    while True:
        try:
            return _micro_steps(run)
        except _AgreedOOM:
            _back_off(run, start)


class _AgreedOOM(Exception):
    """Every rank knows some rank ran out of memory in this micro-step."""


def _micro_steps(run: Run) -> float:
    losses = []
    it = iter(run.loader)
    for _ in range(run.engine.gradient_accumulation_steps()):
        ids = next(it).to(run.dist.device, non_blocking=True)
        mean = _agreed(run, lambda: _forward(run, ids))
        _agreed(run, lambda: run.engine.backward(mean))
        if run.engine.is_gradient_accumulation_boundary() and run.plan.setting.zero == 0:
            run.state_grad_norm = grad_norm(run.model)  # ZeRO-0: DeepSpeed does not keep it
        run.engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        losses.append(mean.detach().float())  # no .item() here: it would wait for the GPU
    total, count = all_reduce_sum([float(torch.stack(losses).sum()), len(losses)],
                                  run.dist.device)  # one sync per optimizer step
    return total / count


def _forward(run: Run, ids: torch.Tensor) -> torch.Tensor:
    _maybe_inject_oom(run)
    mean, _, _ = run.engine(ids)
    return mean


def _agreed(run: Run, fn):
    """Run fn; then every rank learns whether any rank ran out of memory in it.

    Ranks agree after the forward and after the backward, before the next collective. Ranks
    usually run out of memory together (same shapes, same model); one rank alone running out
    inside a collective (ZeRO-3's forward gathers, ZeRO-2's backward reductions) can still hang
    the others until the process group's timeout."""
    oom, out = False, None
    try:
        out = fn()
    except torch.OutOfMemoryError:
        oom = True
    if any_rank(oom, run.dist.device):
        raise _AgreedOOM
    return out


def _maybe_inject_oom(run: Run) -> None:
    """Testing aid (ptlm.run.faults): one OOM, on rank 0 only, in the first micro-step."""
    faults.maybe_oom(run.state.step + 1, 1, "forward", run.dist.is_main)


def _back_off(run: Run, step_start: int) -> None:
    old = run.state.micro_batch
    if old == 1:
        raise PtlmError("out of GPU memory at micro-batch 1: nothing left to halve. Plan again "
                        "for this GPU (`ptlm plan`), e.g. with --checkpointing on, --zero 3 or "
                        "--offload optimizer")
    new = old // 2
    engine = run.engine
    engine.zero_grad()  # drop the partial gradients of the failed step
    if hasattr(engine.optimizer, "zero_grad"):
        engine.optimizer.zero_grad()
    engine.micro_steps -= engine.micro_steps % engine.gradient_accumulation_steps()
    engine.set_train_micro_batch_size(new)
    engine.set_train_batch_size(run.plan.global_batch)  # accumulation doubles
    run.loader.set_micro_batch(new)
    run.loader.consumed = step_start  # redo the same blocks
    run.state.micro_batch = new
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.warning("out of memory at micro-batch %d: every rank now runs micro-batch %d with "
                "accumulation %d (global batch %d unchanged); redoing step %d", old, new,
                engine.gradient_accumulation_steps(), run.plan.global_batch, run.state.step + 1)
    run.metrics.write({"kind": "oom_backoff", "step": run.state.step, "micro_batch": new,
                       "grad_accum": engine.gradient_accumulation_steps()})


def grad_norm(model: nn.Module) -> float:
    """2-norm of all gradients (before clipping), as DeepSpeed's ZeRO optimizers report it."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def log_step(run: Run, loss: float, seconds: float, bar) -> None:
    s = run.state
    tokens = run.plan.global_batch * run.val.seq_len
    tps = tokens / max(seconds, 1e-9)
    lr = run.engine.get_lr()[0]
    norm = run.engine.get_global_grad_norm()
    norm = run.state_grad_norm if norm is None else norm
    mfu = (tps * run.flops_per_token / (run.dist.world_size * run.peak_flops)
           if run.peak_flops else None)
    record = {"kind": "train", "step": s.step, "epoch": run.loader.epoch, "loss": loss,
              "lr": lr, "grad_norm": None if norm is None else float(norm),
              "tokens_per_s": tps, "mfu": mfu, "peak_mem_bytes": peak_memory_bytes(),
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

def train_loop(run: Run) -> None:
    from tqdm import tqdm

    s, cfg, loader = run.state, run.cfg, run.loader
    bar = tqdm(total=run.total_steps, initial=s.step, desc="train", unit="step",
               dynamic_ncols=True) if run.dist.is_main else None
    while s.step < run.total_steps:
        while s.step < run.total_steps and loader.consumed < loader.blocks_per_epoch:
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
            if due(cfg.eval_every, s.step):
                run_eval(run, "every")
            minutes_due = cfg.save_every_minutes > 0 and any_rank(
                time.time() - run.last_save >= 60 * cfg.save_every_minutes, run.dist.device)
            if due(cfg.save_every, s.step) or minutes_due:
                save(run)
            faults.kill_after_step(s.step)  # testing aid: die as a preempted node would
        if loader.consumed == loader.blocks_per_epoch:
            loader.finish_epoch()
            end_epoch(run)
    if bar is not None:
        bar.close()


def finish(run: Run) -> dict:
    from ptlm.run.export import export_hf

    s = run.state
    if not s.epochs or s.epochs[-1]["step"] != s.step:  # stopped mid-epoch (max steps/tokens)
        run_eval(run, "final")
        save(run)
    if run.cfg.export:
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
    return summary


def device_name(dist: Dist) -> str:
    if torch.cuda.is_available():
        return f"{dist.world_size}× {torch.cuda.get_device_name(dist.local_rank)}"
    return f"{dist.world_size}× CPU rank ({os.cpu_count()} cores)"


def run_facts(run: Run) -> dict:
    s = run.state
    epochs_done = len(s.epochs)
    return {
        "model": run.cfg.model, "data": str(run.cfg.data), "seq_len": run.val.seq_len,
        "epochs": epochs_done if epochs_done else f"{s.step}/{run.loader.steps_per_epoch} steps",
        "micro_batch": s.micro_batch, "global_batch": run.plan.global_batch,
        "device": device_name(run.dist), "setting": run.plan.setting.describe(),
        "time_per_epoch_s": (sum(e["time_s"] for e in s.epochs) / epochs_done
                             if epochs_done else None),
        "initial_val_ppl": (s.initial_eval or {}).get("val_ppl"),
        "final_val_ppl": (s.last_eval or {}).get("val_ppl"),
        "steps": s.step, "tokens": s.tokens, "train_seconds": s.train_seconds,
    }


def train(cfg: RunConfig) -> dict:
    run = setup(cfg)
    if not resume(run):
        res = run_eval(run, "initial")
        run.state.initial_eval = {"val_loss": res.loss, "val_ppl": res.ppl, "step": 0}
    train_loop(run)
    return finish(run)
