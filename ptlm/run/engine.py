"""One DeepSpeed engine builder, for training (ptlm.run.trainer) and `ptlm probe` alike: the probe
measures exactly the engine a run with the same plan trains; `rebuild` is the one way either
changes the micro-batch.

    build_engine(plan, source, hyper)
      engine_config     the exact DeepSpeed config (ptlm.plan.dsconfig.engine_config, the file
                        `ptlm plan --write-ds-config` writes)
      _setup_model      the HF model in the plan's precision; under ZeRO-3 built partitioned
                        (HfDeepSpeedConfig -> deepspeed.zero.Init); embeddings checked against
                        the data's ids; activation checkpointing when planned
      _setup_optimizer  ptlm's optimizer (ptlm.model.optim) from the config's hyper-parameters,
                        or None: DeepSpeed's own CPU Adam from the same block
      deepspeed.initialize(LossModule(model), optimizer, config)
      _undo_state_priming  fp16 at ZeRO-0: DeepSpeed's zero-gradient priming step undone
      _scale_loss_once     fp16 at ZeRO-0: the loss scaled before backward, exactly once
      _log_skipped_steps   fp16: an overflowed (skipped) step and the new loss scale logged
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ptlm.errors import PtlmError
from ptlm.model.load import check_vocab, embedding_rows, enable_checkpointing, load_model
from ptlm.model.forward import LossModule
from ptlm.model.profile import packing_mechanism
from ptlm.model.optim import build_optimizer, full_shape
from ptlm.plan.dsconfig import OptimizerHyper, engine_config, optimizer_params
from ptlm.plan.planner import Plan
from ptlm.run.machine.distributed import decided_by_rank0
from ptlm.run.preflight import ModelSource

log = logging.getLogger(__name__)


@dataclass
class Engine:
    """What build_engine made: the DeepSpeed engine around LossModule(model), the HF model itself
    (export, checkpointing), the DeepSpeed config it was built with and the plan."""

    engine: object
    model: nn.Module
    ds_config: dict
    plan: Plan
    parameters: int  # the model's whole parameter count (ds_numel under ZeRO-3)
    embedding_rows: int
    optimizer: str  # the optimizer's class, or "DeepSpeed <type>" when DeepSpeed built it
    packing: dict  # how blocks reach the model (packing_record)

    def record(self) -> dict:
        """The engine's identity, as the run (engine.json) and the probe (its cache) record it."""
        return {"ds_config": self.ds_config, "parameters": self.parameters,
                "embedding_rows": self.embedding_rows, "optimizer": self.optimizer,
                "setting": self.plan.setting.to_dict(), "packing": self.packing}


def build_engine(plan: Plan, source: ModelSource, hyper: OptimizerHyper,
                 ds_template: str | None = None, lr_scheduler=None,
                 ds_extra: dict | None = None, packing: str = "stream") -> Engine:
    """The engine for `plan`. ds_template: a ds_configs/ template the plan fills; ds_extra:
    top-level DeepSpeed config entries added as they are (e.g. {"checkpoint": {...}});
    packing: "documents" makes the engine take each batch's document positions
    (engine(ids, labels, positions)) through the mechanism the model honours."""
    import deepspeed

    ds_config = engine_config(plan, hyper, ds_template, ds_extra)
    model = setup_model(source, plan.setting.precision, ds_config, plan.setting.checkpointing)
    packed = packing_record(packing, model)
    optimizer = _setup_optimizer(plan, model, ds_config)
    engine, _, _, _ = deepspeed.initialize(
        model=LossModule(model, plan.setting.chunked_loss, packed.get("mechanism")),
        optimizer=optimizer, config=ds_config, lr_scheduler=lr_scheduler)
    _undo_state_priming(engine.optimizer)
    _scale_loss_once(engine)
    if plan.setting.precision == "fp16":
        _log_skipped_steps(engine)
    name = (type(optimizer).__name__ if optimizer is not None
            else f"DeepSpeed {ds_config['optimizer']['type']}")
    return Engine(engine=engine, model=model, ds_config=ds_config, plan=plan,
                  parameters=parameter_count(model), embedding_rows=embedding_rows(model),
                  optimizer=name, packing=packed)


def rebuild(build: Callable[[Plan], Engine], plan: Plan, release: Callable[[], None],
            restore: Callable[[object], object] | None = None) -> Engine:
    """The one way ptlm changes an engine's micro-batch (an out-of-memory back-off, a resume at a
    backed-off run's micro-batch, each `ptlm probe` trial): a fresh engine built for `plan`.

    DeepSpeed's set_train_micro_batch_size changes a count only; an engine stopped inside a
    step (the out-of-memory error) also holds partial gradients, ZeRO-1/2 buckets and ZeRO-3's
    gathered parameters, so a new engine is the state that is known to be clean. release()
    drops the caller's references to the old engine first: its memory is what ran out.
    restore(engine), when given, fills the new one (DeepSpeed's load_checkpoint)."""
    release()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    built = build(plan)
    if restore is not None:
        restore(built.engine)
    return built


# What each mechanism runs as, per attention implementation, for the log and engine.json.
PACKING_PATHS = {
    ("position_ids", "flash_attention_2"): "flash-attention varlen (cu_seqlens from position_ids)",
    ("position_ids", "sdpa"): "SDPA with the block-causal mask transformers builds from "
                              "position_ids",
    ("position_ids", "eager"): "eager attention with the block-causal mask transformers builds "
                               "from position_ids",
    ("mask", "sdpa"): "SDPA with ptlm's block-causal mask",
    ("mask", "eager"): "eager attention with ptlm's block-causal mask",
}


def packing_record(packing: str, model: nn.Module) -> dict:
    """{"packing", and for documents "mechanism", "attention", "path"}: how this model is told
    where documents start, decided once (rank 0, by behaviour: ptlm.model.packing) for all."""
    if packing == "stream":
        return {"packing": "stream"}
    attention = model.config._attn_implementation
    mechanism = decided_by_rank0(lambda: packing_mechanism(model.config, attention),
                                 "check how the model takes packed documents")
    path = PACKING_PATHS.get((mechanism, attention), f"{attention} attention via {mechanism}")
    log.info("packing: documents; each document attends only to itself through %s", path)
    return {"packing": "documents", "mechanism": mechanism, "attention": attention, "path": path}


# DeepSpeed's fp16 wrappers for ZeRO-0 (fp16/unfused_optimizer.py, fused_optimizer.py).
FP16_ZERO0_WRAPPERS = ("FP16_UnfusedOptimizer", "FP16_Optimizer")


def _undo_state_priming(wrapper) -> None:
    """DeepSpeed's fp16 optimizers for ZeRO-0 "initialize the optimizer states" by stepping the
    client optimizer once on all-zero gradients (initialize_optimizer_states). AdamW then counts
    that step, so the first real step gets step 2's bias correction (a ~27% smaller update with
    betas 0.9/0.95), and its decoupled weight decay has already shrunk the fp32 masters once.
    Found by the setting matrix: fp16 ZeRO-0 trailed the plain-PyTorch reference by 0.11 in
    loss after 8 steps. Undone here: the client's state is cleared (re-created at the first
    real step, as on every other path) and the masters are copied back from the 16-bit weights
    they were cloned from, which the priming step did not touch."""
    if type(wrapper).__name__ not in FP16_ZERO0_WRAPPERS:
        return
    wrapper.optimizer.state.clear()
    if hasattr(wrapper, "fp32_groups_flat"):  # FP16_Optimizer: one flat fp32 tensor per group
        for master, half in zip(wrapper.fp32_groups_flat, wrapper.fp16_groups_flat):
            master.data.copy_(half.data)
        return
    for masters, group in zip(wrapper.fp32_groups, wrapper.fp16_groups):
        for master, p in zip(masters, group):
            master.data.copy_(p.data)


def _scale_loss_once(engine) -> None:
    """fp16 at ZeRO-0: make engine.backward scale the loss by the wrapper's loss scale, once.

    The fp16 wrappers' step() always divides the gradients by the current loss scale (65,536 at
    the start). Whether DeepSpeed's engine.backward multiplies the loss by it first depends on the
    version: older DeepSpeed did (through the wrapper's own backward()), 0.19.8 does not for this
    wrapper (DeepSpeed PR #8393, open), and that PR may land as an inline multiply. Unscaled, small
    fp16 gradients underflow to zero (3% of them at the first step, 7% by the seventh, in the
    setting matrix's model), the rest arrive 65,536x too small for Adam's eps, and clipping never
    triggers: fp16 ZeRO-0 trailed the reference by 0.08 in loss after 8 steps. Scaled twice, every
    step would overflow. So the behaviour is measured here, not inferred from a class or version
    (_deepspeed_loss_factor), and ptlm multiplies only when DeepSpeed did not: one scaling on every
    DeepSpeed version (tests/test_engine.py checks the gradients' factor under all three)."""
    scaler = _zero0_loss_scaler(engine)
    if scaler is None:
        return
    factor, scale = _deepspeed_loss_factor(engine), float(scaler.cur_scale)
    if math.isclose(factor, scale, rel_tol=SCALE_MATCH_TOLERANCE):
        log.info("fp16 ZeRO-0: DeepSpeed's backward scales the loss by %g itself", scale)
        return
    if not math.isclose(factor, 1.0, rel_tol=SCALE_MATCH_TOLERANCE):
        raise PtlmError(f"fp16 ZeRO-0: DeepSpeed's backward multiplied the loss by {factor:g}, "
                        f"neither 1 nor the loss scale {scale:g}: this DeepSpeed is not supported")
    log.info("fp16 ZeRO-0: DeepSpeed's backward leaves the loss unscaled; ptlm scales it by the "
             "loss scale (%g at start)", scale)
    ds_backward = engine.backward

    def backward(loss, *args, **kwargs):
        scale = scaler.cur_scale  # constant within an optimizer step: step() updates it
        return ds_backward(loss.float() * scale, *args, **kwargs) / scale

    engine.backward = backward


# The probe's factor is a power of two (the scale) or 1, exactly, in fp32: any slack would do.
SCALE_MATCH_TOLERANCE = 1e-3


def _deepspeed_loss_factor(engine) -> float:
    """What DeepSpeed's engine.backward multiplies a loss by before autograd: one backward of a
    loss made from a scalar leaf of its own (d loss / d leaf = 1), read from the leaf's .grad.
    The leaf touches no parameter, so no gradient of the model changes; the engine's gradient
    all-reduce (a collective over those untouched gradients) is held off for the probe, and
    gradient accumulation's division is skipped (scale_wrt_gas=False)."""
    import torch

    leaf = torch.ones((), device=engine.device, requires_grad=True)
    allreduce = engine.enable_backward_allreduce
    engine.enable_backward_allreduce = False
    try:
        engine.backward(leaf * 1.0, scale_wrt_gas=False)
    finally:
        engine.enable_backward_allreduce = allreduce
    return float(leaf.grad)


# bench/gpu_check.py reads the skipped steps from this line (its reference skips them too).
SKIPPED_STEP_MESSAGE = ("fp16 gradient overflow in optimizer step %d: update skipped (weights and "
                        "LR schedule unchanged, the batch consumed); loss scale %g -> %g")


def _log_skipped_steps(engine) -> None:
    """fp16: say when DeepSpeed skipped an update because a gradient overflowed, and what the
    loss scale became. DeepSpeed decides it on every rank alike (its overflow flag is all-reduced)
    and counts it in engine.skipped_steps, but says so only at ZeRO-1/2/3, on rank 0's stdout;
    the ZeRO-0 wrapper says nothing. The batch is consumed, the weights, the optimizer's state
    and the LR schedule do not move (tests/test_fp16_overflow.py)."""
    ds_step = engine.step

    def step(*args, **kwargs):
        skipped, scale = engine.skipped_steps, _loss_scale(engine)
        out = ds_step(*args, **kwargs)
        if engine.skipped_steps > skipped:
            log.warning(SKIPPED_STEP_MESSAGE, engine.global_steps, scale, _loss_scale(engine))
        return out

    engine.step = step


def _loss_scale(engine) -> float:
    """The fp16 loss scale of DeepSpeed's optimizer wrapper (ZeRO-0's or a ZeRO optimizer)."""
    return float(getattr(engine.optimizer, "loss_scale", float("nan")))


def _zero0_loss_scaler(engine):
    """The loss scaler of DeepSpeed's fp16 ZeRO-0 wrapper (None for every other optimizer, and
    for bf16, which the same wrapper runs without scaling)."""
    wrapper = engine.optimizer
    if type(wrapper).__name__ not in FP16_ZERO0_WRAPPERS:
        return None
    scaler = getattr(wrapper, "loss_scale_config", wrapper)  # DeepSpeed < 0.19: on the wrapper
    return scaler if getattr(scaler, "use_grad_scaling", True) else None


def gradient_scale(engine) -> float:
    """The factor the parameters' .grad carry between backward and step (fp16 at ZeRO-0: the
    loss scale; 1 everywhere else): divide by it to read the true gradient."""
    scaler = _zero0_loss_scaler(engine)
    return 1.0 if scaler is None else float(scaler.cur_scale)


def setup_model(source: ModelSource, precision: str, ds_config: dict | None = None,
                checkpointing: bool = False) -> nn.Module:
    """The HF model in `precision`, its embeddings large enough for the data's ids. With a ZeRO-3
    DeepSpeed config transformers builds it partitioned (deepspeed.zero.Init through
    HfDeepSpeedConfig, alive while the model loads and its vocabulary is checked): no rank ever
    holds the whole model."""
    zero3 = None
    if ds_config and ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        zero3 = HfDeepSpeedConfig(ds_config)
    try:
        model = load_model(source.config if source.from_scratch else source.spec,
                           precision=precision)
        if source.vocab is not None:
            check_vocab(model, source.vocab)
        if checkpointing:
            enable_checkpointing(model)
    finally:
        del zero3  # later from_pretrained calls in this process load whole again
    return model


def _setup_optimizer(plan: Plan, model: nn.Module, ds_config: dict):
    """ptlm's optimizer on the model's parameters, with the config's hyper-parameters; None when
    DeepSpeed must build its CPU Adam itself (from the same "optimizer" block)."""
    return build_optimizer(plan.setting, model.named_parameters(), **optimizer_params(ds_config))


def parameter_count(model: nn.Module) -> int:
    """All of the model's parameters, also when ZeRO-3 holds only a partition of each."""
    total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None)
        if n is None:
            n = 1
            for d in full_shape(p):
                n *= d
        total += n
    return total
