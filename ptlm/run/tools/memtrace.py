"""Measure a training step's memory by running it: FakeTensorMode (no compute) + MemTracker.

`measure_step` builds the model from a config, runs real training steps (forward, backward,
optimizer step, zero_grad) and reports the last step's peak with MemTracker's breakdown. Under
`torch._subclasses.fake_tensor.FakeTensorMode` every tensor is a shape without storage, so
OPT-125M at 16 x 1024 tokens "runs" in seconds on a laptop CPU and allocates nothing; with
fake=False the same code runs for real (small configs), to cross-check the fake figures.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from ptlm.errors import PtlmError
from ptlm.model.load import load_model
from ptlm.model.forward import LossModule
from ptlm.model.packing import stand_in_positions
from ptlm.model.profile import fake_trace, packing_mechanism, without_attention_dropout
from ptlm.model.optim import build_optimizer
from ptlm.plan.setting import PLAIN_HF, Setting

LR = 1e-4  # any value: memory does not depend on it
FP16_LOSS_SCALE = 2.0**16  # DeepSpeed's initial dynamic loss scale (initial_scale_power 16)
ALLREDUCE_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's MEMORY_OPT_ALLREDUCE_SIZE (engine.py)
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps smaller tensors' states in fp32
BNB_BLOCK_SIZE = 256  # bitsandbytes blockwise quantization: one fp32 absmax per block
BNB_QMAP_SIZE = 256  # the 8-bit dynamic quantization map, fp32
PHASES = ("forward", "backward", "optimizer")
# MemTracker's reference types -> the keys of measure_step's result.
CATEGORIES = {"Parameter": "parameters", "Buffer": "buffers", "Gradient": "gradients",
              "Optstate": "optimizer_states", "Activation": "activations", "Temp": "temporaries",
              "Other": "other"}


def measure_step(config, setting: Setting, seq_len: int, steps: int = 2, fake: bool = True, *,
                 attn: str = "sdpa", engine: str = "auto", packing: str = "stream") -> dict:
    """Peak memory of a steady-state training step of `config` under `setting`, in bytes.

    Runs `steps` full steps (forward + backward + optimizer step + zero_grad) at batch
    setting.micro_batch x seq_len on one CPU device, fake (FakeTensorMode, default) or real, and
    reports the last one: the first step has no optimizer states yet. The step is ptlm's loop:
    `causal_lm_loss` (chunked or HF per setting.chunked_loss) returns only the loss, so the logits
    are freed before backward, as in HF Trainer (a loop that keeps `model(...)`'s output alive
    through backward holds one more fp32 logits tensor: 21.65 instead of 18.59 GiB for plain
    OPT-125M at 16 x 1024).

    packing: "documents" runs ptlm's document-aware step (ptlm.model.forward.LossModule with
      stand-in document positions, ptlm.model.packing.stand_in_positions), "stream" one
      sequence per block.
    attn: the attention implementation measured ("sdpa", "eager"). With SDPA the config's
      attention dropout is zeroed for the measurement (see ptlm.model.profile.without_attention_dropout), so the
      figure is what CUDA's fused SDPA kernels allocate, not CPU's math fallback.
    engine: "torch" = the plain HF recipe (model in fp32 or 16-bit, the optimizer steps it);
      "deepspeed" = what DeepSpeed's engine holds at ZeRO-0 on one GPU with our client optimizer;
      "auto" = "torch" for PLAIN_HF at any micro-batch, else "deepspeed". The DeepSpeed emulation
      (read from deepspeed/runtime/engine.py and runtime/fp16/unfused_optimizer.py, v0.19.8; its
      steady-state peak equals a real DeepSpeed engine's on CPU under MemTracker to a few bytes,
      see tests/test_memtrace.py):
      - bf16/fp16 with a client optimizer at ZeRO-0 is FP16_UnfusedOptimizer (bf16 included, since
        the default grad_accum_dtype equals the model dtype): the model holds 16-bit params and
        grads; the optimizer holds one fp32 master copy per param plus the inner optimizer's states
        (AdamW: fp32 m, v). In step() it builds fp32 grads for all params at once (the 16-bit grads
        stay alive until zero_grad), runs the inner step, frees the fp32 grads, copies back.
      - fp16 backward runs on loss * 2**16 and the fp32 grads are unscaled (no overflow check:
        its per-tensor `.item()` cannot run under FakeTensorMode; its transient is one fp32 copy of
        one tensor at a time).
      - After backward the engine all-reduces the grads even on one GPU, through a flat copy of
        up to 5e8 elements per bucket (allreduce_no_retain); emulated at the start of step().
      - fp32 at ZeRO-0: DeepSpeed steps the client optimizer directly (plus the bucket copy).
      Not emulated: ZeRO-1/2/3 and offload (use ptlm.plan.memory), the CUDA context, allocator
      fragmentation/caching, and kernel workspaces (cuBLAS) -- the measured figure is the sum of
      live tensors, what torch.cuda.max_memory_allocated would report at best.

    Under FakeTensorMode the bitsandbytes optimizer cannot run (its quantile map and kernels need
    data); a stand-in allocates exactly bitsandbytes' state layout (uint8 m and v, one fp32 absmax
    per 256 elements, fp32 states below 4096 elements); fake=False uses bitsandbytes itself.

    Returns a dict (sizes in bytes):
      peak_bytes: the last step's peak. parameters, buffers, gradients, optimizer_states,
        activations, temporaries, other: MemTracker's categories at that peak (they sum to
        peak_bytes; "temporaries" = tensors created in backward, e.g. activation grads; DeepSpeed's
        transient fp32 grads and bucket copy count as optimizer_states).
      master_params_bytes: the fp32 master weights (inside optimizer_states; 0 without them).
      model_states_bytes: what stays allocated between steps (params, buffers, optimizer states).
      peak_phase: "forward" | "backward" | "optimizer" -- where the last step peaked.
      phase_peaks: {phase: peak within that phase of the last step}.
      step_peaks: [each step's peak] -- equal last entries mean the steady state was reached.
      engine, fake, seq_len, micro_batch, setting (Setting.to_dict()), seconds (wall time).
    """
    if setting.zero != 0:
        raise PtlmError(f"measure_step runs one device, ZeRO stage 0; got ZeRO-{setting.zero}. "
                        "Estimate sharded settings with ptlm.plan.memory")
    if steps < 1 or seq_len < 2:
        raise PtlmError(f"need steps >= 1 and seq_len >= 2, got steps={steps}, seq_len={seq_len}")
    if engine == "auto":
        engine = "torch" if setting.with_(micro_batch=PLAIN_HF.micro_batch) == PLAIN_HF else "deepspeed"
    if engine not in ("torch", "deepspeed"):
        raise PtlmError(f"engine must be 'auto', 'torch' or 'deepspeed', got {engine!r}")
    start = time.perf_counter()
    if attn in ("sdpa", "auto"):  # "auto": SDPA, or eager where the model has no SDPA path
        config = without_attention_dropout(config)
    documents = packing == "documents"
    # decided on real tensors, before the fake ones: it runs a small model of the architecture
    mechanism = packing_mechanism(config, "sdpa" if attn == "auto" else attn) if documents else None
    with fake_trace(packed=documents) if fake else contextlib.nullcontext():
        model = load_model(config, setting.precision, attn=attn, checkpointing=setting.checkpointing)
        model.train()
        optimizer = _build(model, setting, engine, fake)
        result = _run(LossModule(model, setting.chunked_loss, mechanism), optimizer, setting,
                      seq_len, steps, config.vocab_size)
    result.update(master_params_bytes=_master_bytes(optimizer), engine=engine, fake=fake,
                  seq_len=seq_len, micro_batch=setting.micro_batch, setting=setting.to_dict(),
                  seconds=round(time.perf_counter() - start, 2))
    return result


def _build(model, setting: Setting, engine: str, fake: bool) -> torch.optim.Optimizer:
    def make_inner(named_params):
        if setting.optimizer == "adamw8bit" and fake:
            return _FakeAdamW8bit([p for _, p in named_params])
        return build_optimizer(setting, named_params, lr=LR)

    named = list(model.named_parameters())
    if engine == "torch":
        return make_inner(named)
    loss_scale = FP16_LOSS_SCALE if setting.precision == "fp16" else 1.0
    return _DeepSpeedZero0(named, make_inner, setting.precision != "fp32", loss_scale)


def _run(step: LossModule, optimizer, setting: Setting, seq_len: int, steps: int,
         vocab_size: int) -> dict:
    tracker = _PhaseTracker()
    tracker.track_external(step.model, *_optimizers(optimizer))
    loss_scale = getattr(optimizer, "loss_scale", 1.0)
    step_peaks, phases = [], {}
    with tracker:
        for _ in range(steps):
            tracker.reset_mod_stats()  # MemTracker refuses a second iteration otherwise
            tracker.reset_peak()
            input_ids = torch.randint(0, vocab_size, (setting.micro_batch, seq_len))  # (B, T)
            positions = None
            if step.mechanism is not None:
                positions = stand_in_positions(setting.micro_batch, seq_len)
            loss, _, _ = step(input_ids, None, positions)
            phases["forward"] = tracker.end_phase()
            (loss.float() * loss_scale if loss_scale != 1.0 else loss).backward()
            del loss
            phases["backward"] = tracker.end_phase()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            phases["optimizer"] = tracker.end_phase()
            step_peaks.append(max(snap["Total"] for snap in phases.values()))
        states = tracker.get_tracker_snapshot("current")
    peak_phase = max(PHASES, key=lambda phase: phases[phase]["Total"])
    peak = phases[peak_phase]
    result = {"peak_bytes": peak["Total"]}
    result.update({key: peak.get(ref, 0) for ref, key in CATEGORIES.items()})
    result.update(model_states_bytes=_single_device(states)["Total"], peak_phase=peak_phase,
                  phase_peaks={phase: phases[phase]["Total"] for phase in PHASES},
                  step_peaks=step_peaks)
    return result


class _PhaseTracker(MemTracker):
    """MemTracker whose peak can restart, so each phase of each step gets its own peak."""

    def reset_peak(self) -> None:
        # The same two fields MemTracker.__enter__ initializes its peak from.
        self._peak_mem_snap = self.get_tracker_snapshot("current")
        self._peak_mem = {dev: snap["Total"] for dev, snap in self._peak_mem_snap.items()}

    def end_phase(self) -> dict:
        """The peak snapshot since the last reset ({category name: bytes, "Total": bytes}); resets."""
        peak = _single_device(self.get_tracker_snapshot("peak"))
        self.reset_peak()
        return peak


def _single_device(snapshot: dict) -> dict:
    if len(snapshot) > 1:
        raise RuntimeError(f"measure_step expects one device, MemTracker saw {list(snapshot)}")
    device_snap = next(iter(snapshot.values()), {"Total": 0})
    return {getattr(ref, "value", ref): size for ref, size in device_snap.items()}


def _optimizers(optimizer) -> list:
    inner = getattr(optimizer, "inner", None)
    return [optimizer] if inner is None else [optimizer, inner]


def _master_bytes(optimizer) -> int:
    masters = getattr(optimizer, "masters", [])
    return sum(m.numel() * m.element_size() for m in masters)


class _DeepSpeedZero0(torch.optim.Optimizer):
    """The memory behaviour of DeepSpeed's engine + FP16_UnfusedOptimizer at ZeRO-0 (see measure_step).

    A torch Optimizer so that MemTracker's optimizer hooks count what it allocates as optimizer
    states; the fp32 masters live in its `state` for the same reason.
    """

    def __init__(self, named_params, make_inner, mixed_precision: bool, loss_scale: float):
        params = [p for _, p in named_params if p.requires_grad]
        super().__init__(params, defaults={})
        self.loss_scale = loss_scale
        self.masters = []
        if mixed_precision:
            for p in params:
                # A leaf that requires grad, like DeepSpeed's, so the inner optimizer accepts it.
                self.state[p]["master"] = p.detach().to(torch.float32, copy=True).requires_grad_()
                self.masters.append(self.state[p]["master"])
            named_masters = [(name, self.state[p]["master"]) for name, p in named_params
                             if p.requires_grad]
            self.inner = make_inner(named_masters)
        else:
            self.inner = make_inner(named_params)

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        _allreduce_bucket_copies(params)
        if not self.masters:
            return self.inner.step()
        for p in params:  # fp32 grads for every param at once, as FP16_UnfusedOptimizer.step does
            master = self.state[p]["master"]
            master.grad = torch.zeros_like(master) if p.grad is None else p.grad.to(torch.float32)
            if self.loss_scale != 1.0:
                master.grad.mul_(1.0 / self.loss_scale)
        self.inner.step()
        for p in params:
            master = self.state[p]["master"]
            master.grad = None
            p.copy_(master)

    def zero_grad(self, set_to_none: bool = True):
        super().zero_grad(set_to_none=set_to_none)


def _allreduce_bucket_copies(params) -> None:
    """The engine's post-backward all-reduce: a flat copy per bucket of <= 5e8 elements, copied back."""
    bucket, numel = [], 0
    for p in params:
        if p.grad is None:
            continue
        bucket.append(p.grad)
        numel += p.grad.numel()
        if numel > ALLREDUCE_BUCKET_ELEMENTS:
            _flatten_and_copy_back(bucket)
            bucket, numel = [], 0
    if bucket:
        _flatten_and_copy_back(bucket)


def _flatten_and_copy_back(grads) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])  # (numel,) the bucket DeepSpeed all-reduces
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


class _FakeAdamW8bit(torch.optim.Optimizer):
    """Allocates bitsandbytes AdamW8bit's optimizer states (v0.50 layout), does no arithmetic.

    For FakeTensorMode only, where bitsandbytes cannot run. Per param with >= 4096 elements:
    state1/state2 uint8 (numel each) and absmax1/absmax2 fp32 (one per 256-element block), plus
    two 256-entry fp32 quantization maps shared by all params; smaller params: fp32 state1/state2.
    """

    def __init__(self, params):
        super().__init__(params, defaults={})
        self.qmaps = None

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not self.state[p]:
                    self.state[p].update(self._new_state(p))

    def _new_state(self, p: torch.Tensor) -> dict:
        if p.numel() < BNB_MIN_8BIT_SIZE:
            return {"state1": torch.zeros_like(p, dtype=torch.float32),
                    "state2": torch.zeros_like(p, dtype=torch.float32)}
        if self.qmaps is None:
            self.qmaps = [torch.zeros(BNB_QMAP_SIZE, dtype=torch.float32, device=p.device)
                          for _ in range(2)]
        blocks = -(-p.numel() // BNB_BLOCK_SIZE)
        return {"state1": torch.zeros_like(p, dtype=torch.uint8),
                "state2": torch.zeros_like(p, dtype=torch.uint8),
                "qmap1": self.qmaps[0], "qmap2": self.qmaps[1],
                "absmax1": torch.zeros(blocks, dtype=torch.float32, device=p.device),
                "absmax2": torch.zeros(blocks, dtype=torch.float32, device=p.device)}
