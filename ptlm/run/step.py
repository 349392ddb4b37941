"""One optimizer step: `accum` micro-batches through the engine, then engine.step().

    optimizer_step(run)
      _micro_steps        the global batch's blocks; each micro-step's NLL sum weighted so the
                          step's gradient is the mean over every scored token of every rank
        _agreed(_forward) / _agreed(_backward) / _agreed(_engine_step)
                          after each, every rank learns whether any rank ran out of memory
      on an agreed out-of-memory error: _back_off halves the micro-batch in a rebuilt engine
                          (use_micro_batch -> ptlm.run.engine.rebuild) and the step is redone
                          from the blocks and random state it started with
"""

from __future__ import annotations

import logging
import shutil

import torch
from torch import nn

from ptlm.data.reader import Batch
from ptlm.errors import PtlmError
from ptlm.plan.planner import with_micro_batch
from ptlm.run import checkpoint
from ptlm.run.engine import gradient_scale, rebuild
from ptlm.run.machine import faults
from ptlm.run.machine.distributed import all_reduce_sum, any_rank, barrier, host_sum
from ptlm.run.schedule import base_segment, install_schedule
from ptlm.run.state import Run

log = logging.getLogger(__name__)


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
    """Testing aid (ptlm.run.machine.faults, PTLM_FAULT_OOM=STEP:MICRO:PHASE): one OOM in optimizer step
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
    use_micro_batch(run, new, lambda engine: engine.load_checkpoint(
        str(tmp), tag="step_start", load_optimizer_states=True, load_lr_scheduler_states=True))
    barrier()
    if run.dist.is_main:
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


def use_micro_batch(run: Run, micro: int, restore) -> None:
    """Go on at `micro` (same global batch) in an engine built for it (ptlm.run.engine.rebuild);
    restore(engine) fills it (load_checkpoint). The loader and the run's state follow."""
    plan = with_micro_batch(run.plan, micro)

    def release() -> None:
        run.engine = run.model = None

    built = rebuild(run.build, plan, release, restore)
    run.engine, run.model, run.plan = built.engine, built.model, plan
    run.loader.set_micro_batch(micro)
    run.state.micro_batch = micro
    if run.state.schedule and run.state.schedule != [base_segment(run.cfg, run.total_steps)]:
        install_schedule(run)  # a continued / re-warmed schedule survives the rebuild


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

