"""The training run: `deepspeed launch/train.py ...` (or `python launch/train.py ...`), top to
bottom:

    setup          data + checks, plan (ptlm.run.preflight), engine (ptlm.run.engine)
    resume         a checkpoint, when there is one (ptlm.run.resume); else eval at step 0
    train_loop     optimizer_step (ptlm.run.step): accum micro-batches, engine.step(); log;
                   eval / save when due; at each epoch's end: eval + save
    finish         the HF folder (export), summary.json, report.md + loss.png

The run's data is `Run` / `RunState` (ptlm.run.state); the LR schedule and its continuation
after a resume are ptlm.run.schedule's.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict

import torch

from ptlm.data.reader import PackedDataset, PackedLoader
from ptlm.plan.mfu import flops_per_token, mfu, peak_flops
from ptlm.run import checkpoint, changed, preflight, report
from ptlm.run.config import RunConfig
from ptlm.run.engine import build_engine
from ptlm.run.evaluate import EvalResult, evaluate_blocks
from ptlm.run.export import export_hf
from ptlm.run.machine import faults, lock
from ptlm.run.machine.distributed import Dist, any_rank, barrier, init
from ptlm.run.resume import batch_product, resume, resume_source
from ptlm.run.schedule import base_segment, scheduler_factory, total_steps
from ptlm.run.state import Run, RunState
from ptlm.run.step import optimizer_step

log = logging.getLogger(__name__)

EXPORT_DIR = "hf_model"


# ------------------------------------------------------------------------------ setup

def overfit_blocks(data: PackedDataset, n_docs: int) -> int:
    """Blocks that hold the first n_docs documents of the split."""
    lengths = data.document_lengths()
    return min(len(data), max(1, math.ceil(int(lengths[:n_docs].sum()) / data.seq_len)))


def setup(cfg: RunConfig) -> Run:
    """Everything before step 1, in the order a problem should surface: the data and its checks,
    the plan (rank 0's, shared), the run folder's lock, the checkpoint to resume from, the
    engine. Nothing is written to the run folder yet (write_records, after resume's checks)."""
    dist = init()
    torch.manual_seed(cfg.corpus.seed)  # the same initial weights on every rank
    train, val = _setup_data(cfg)
    gpu = preflight.on_gpu()
    source = preflight.model_source(cfg.what.model, cfg.what.from_scratch, train)
    p = preflight.resolve_plan(cfg, source.config, train.seq_len, dist.world_size, gpu)
    loader = PackedLoader(train, p.micro_batch, world_size=dist.world_size, rank=dist.rank,
                          global_batch=p.global_batch, seed=cfg.corpus.seed)
    steps = total_steps(cfg, loader.steps_per_epoch, p.global_batch * train.seq_len)
    lock.acquire_for_run(cfg.out, dist)  # one writer per run folder, before anything is written
    checkpoint.check_shared(cfg.out, dist)  # before any rank looks for a checkpoint there
    resume_from, universal = resume_source(cfg, dist, p.setting)
    build = _engine_builder(cfg, source, steps, universal)
    built = build(p)
    if dist.is_main:
        log.info("plan: %s; micro-batch %d x %d rank(s) x %d accumulation = global batch %d; "
                 "%d steps (%d per epoch)", p.setting.describe(), p.micro_batch, dist.world_size,
                 p.grad_accum, p.global_batch, steps, loader.steps_per_epoch)
    barrier()
    hw = p.hardware
    peak = peak_flops(p.setting.precision, hw.peak_tflops, hw.fp32_tflops) if gpu else None
    return Run(cfg=cfg, dist=dist, engine=built.engine, model=built.model, loader=loader,
               val=val, plan=p, total_steps=steps,
               metrics=report.MetricsLog(cfg.out, dist.is_main),
               state=RunState(micro_batch=p.micro_batch), resume_from=resume_from,
               universal=universal, build=build,
               records={"run_config.json": _run_config(cfg, p, dist), "plan.json": p.to_dict(),
                        "ds_config.json": built.ds_config, "engine.json": built.record()},
               flops_per_token=flops_per_token(p.model, train.seq_len), peak_flops=peak)


def _setup_data(cfg: RunConfig) -> tuple[PackedDataset, PackedDataset]:
    """The training and validation splits, checked (shards, tokenizer) before any model is
    built; --overfit-docs N: the first N training documents, for both."""
    packing = cfg.corpus.packing
    train = PackedDataset(cfg.corpus.data, "train", packing=packing)
    val = PackedDataset(cfg.corpus.data, "val", packing=packing)
    train.check_data()  # every shard's sha256 + largest id, before step 1 (PTLM_DATA_CHECK)
    preflight.check_tokenizer(cfg, train)
    if cfg.corpus.overfit_docs:
        n = overfit_blocks(train, cfg.corpus.overfit_docs)
        train = PackedDataset(cfg.corpus.data, "train", max_blocks=n, packing=packing)
        # can it learn what it saw?
        val = PackedDataset(cfg.corpus.data, "train", max_blocks=n, packing=packing)
        log.info("overfit check: training and evaluating on the first %d documents (%d blocks)",
                 cfg.corpus.overfit_docs, n)
    return train, val


def _engine_builder(cfg: RunConfig, source, steps: int, universal: bool):
    """plan -> Engine: the run's engine for a plan, at the start and again whenever the
    micro-batch changes (ptlm.run.engine.rebuild). `universal`: the checkpoint to resume was
    written by another number of ranks with partitioned optimizer states, so DeepSpeed loads
    it in its universal format."""
    extra = {"checkpoint": {"load_universal": True}} if universal else None

    def build(plan):
        return build_engine(plan, source, preflight.optimizer_hyper(cfg.optim), cfg.what.ds_config,
                            lr_scheduler=scheduler_factory(cfg, steps), ds_extra=extra,
                            packing=cfg.corpus.packing)
    return build


def _run_config(cfg: RunConfig, p, dist: Dist) -> dict:
    """run_config.json: the flags, with the global batch the run trains with (the planner
    rounds a --global-batch that whole micro-batches cannot make, and says so)."""
    run_config = cfg.to_dict()
    if cfg.optim.global_batch and p.global_batch != cfg.optim.global_batch:
        _warn_rounded_global_batch(cfg, p, dist)
        run_config["optim"]["global_batch"] = p.global_batch  # the one trained with
        run_config["global_batch_requested"] = cfg.optim.global_batch
    return run_config


def _warn_rounded_global_batch(cfg: RunConfig, p, dist: Dist) -> None:
    """The planner rounds a --global-batch that micro-batch x ranks cannot make (its note went
    to plan.json only); a user who resumes with the same flag later deserves to know."""
    if dist.is_main:
        log.warning("--global-batch %d cannot be made from whole micro-batches on %d rank(s): "
                    "training with global batch %d (%s); give --global-batch %d to ask for it, "
                    "or a --micro-batch that divides %s sequences per rank", cfg.optim.global_batch,
                    dist.world_size, p.global_batch, batch_product(p, dist.world_size),
                    p.global_batch, f"{cfg.optim.global_batch / dist.world_size:g}")


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


# ------------------------------------------------------------------------------ eval, save, log

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


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    import psutil

    return psutil.Process().memory_info().rss


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


def save_due(run: Run) -> bool:
    """Every --save-every steps, or once --save-every-minutes have passed since the last save.
    The clock is each rank's own: they agree (any rank's) so every rank enters the save, a
    collective, together."""
    ckpt = run.cfg.ckpt
    minutes = ckpt.save_every_minutes > 0 and any_rank(
        time.time() - run.last_save >= 60 * ckpt.save_every_minutes, run.dist.device)
    return due(ckpt.save_every, run.state.step) or minutes


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
            if save_due(run):
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
