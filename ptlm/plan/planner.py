"""Choose a training setting: the fastest one (by a simple cost model) that fits in memory.

`plan(model, hw, job, forced)` is pure. It enumerates every valid `Setting` (precision × ZeRO stage
× offload × checkpointing × optimizer × chunked loss; `Setting` itself refuses the invalid
combinations), keeps only the forced values where some are given, finds for each the largest
micro-batch that fits (`ptlm.plan.memory.estimate`), splits the global batch into micro-batch ×
accumulation × GPUs, predicts tokens/s, and returns the fastest. Candidates within
`TIE_TOLERANCE` of the fastest count as ties, broken by `_preference` (the least intrusive setting).

Cost model (per optimizer step; docs/planner.md):
  compute   = tokens × FLOPs/token × (4/3 with checkpointing) / (peak × MFU_CEILING)
              + per-layer launch overhead per micro-step (more under ZeRO-3's hooks)
  FLOPs/token = 6·N + 12·L·h·s            (PaLM Appendix B, as nanoGPT's estimate_mfu;
                                            ptlm.plan.mfu, with the MFU every figure uses)
  comm      = bytes moved / bus bandwidth (ZeRO-0/1: one all-reduce per step; ZeRO-2: reduce-
              scatter per micro-step + all-gather per step; ZeRO-3: gather per forward/backward
              pass + reduce-scatter per micro-step), no overlap assumed
  offload   = PCIe copies + DeepSpeed CPU-Adam time; optimizer step on GPU = bytes / HBM bandwidth
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace

from ptlm.errors import PtlmError
from ptlm.plan.facts import GiB, HardwareFacts, ModelFacts
from ptlm.plan.mfu import flops_per_token, mfu, peak_flops
from ptlm.plan.memory import (
    PRECISION_BYTES,
    DsBuffers,
    Job,
    MemoryBreakdown,
    ds_buffers,
    estimate,
    gpu_fixed_bytes,
    usable_gpu_bytes,
)
from ptlm.plan.setting import OFFLOADS, OPTIMIZERS, PRECISIONS, ZERO_STAGES, Setting

# ----------------------------------------------------------------------------------------------
# Cost-model constants
# ----------------------------------------------------------------------------------------------
# Checkpointing recomputes the forward: +2·N of the 6·N (reference figures: +20-33%).
CHECKPOINTING_COMPUTE_FACTOR = 4 / 3
# Fraction of peak a well-fed step reaches: nanoGPT ~30%, llm.c ~38-56% (reference figures);
# HF + DeepSpeed sits in between.
MFU_CEILING = 0.40
# Kernel launches + Python per decoder layer per micro-step (forward + backward). Small
# micro-batches pay it relatively more, which is why larger micro-batches are faster.
LAYER_OVERHEAD_S = 1.0e-3
# ZeRO-3's fetch/release hooks around every module, per layer per micro-step.
ZERO3_LAYER_OVERHEAD_S = 1.0e-3
# Bytes the optimizer step streams per local parameter on the GPU (read grad, read+write master,
# m and v, write the 16-bit weights): AdamW fp32 states ≈ 32, 8-bit states ≈ 18.
ADAMW_STEP_BYTES_PER_PARAM = {"adamw": 32, "adamw8bit": 18}
# DeepSpeed CPU-Adam parameter updates per second per node (ZeRO-Offload paper: ~1B params in
# ~0.3-0.5 s on a many-core Xeon). A small host is slower; this only ranks offload plans.
CPU_ADAM_PARAMS_PER_S = 2e9
# Bandwidth between nodes per GPU (100 Gb/s Ethernet/InfiniBand ≈ 12.5 GB/s).
INTER_NODE_BYTES_PER_S = 12.5e9
# Throughputs within 3% of the best are ties: the model is not that precise.
TIE_TOLERANCE = 0.03
# Policy, not physics: 8-bit optimizer states change the optimizer's numerics and make its
# checkpoints fragile (reference figures: DeepSpeed PR #1582), so they must buy >10% tokens/s
# (or be the only way to fit) before the planner takes them.
ADAMW8BIT_DISCOUNT = 0.10
# How many runners-up a plan lists.
ALTERNATIVES_SHOWN = 5
# When nothing fits: how far to look for "with more GPUs it would fit" (nodes multiplier).
MAX_SCALE_OUT = 256


@dataclass(frozen=True)
class Candidate:
    setting: Setting  # micro_batch is the chosen one
    grad_accum: int
    global_batch: int
    memory: MemoryBreakdown
    tokens_per_s: float
    step_seconds: float
    mfu: float

    def to_dict(self) -> dict:
        return {"setting": self.setting.to_dict(), "grad_accum": self.grad_accum,
                "global_batch": self.global_batch, "memory": self.memory.to_dict(),
                "tokens_per_s": self.tokens_per_s, "step_seconds": self.step_seconds,
                "mfu": self.mfu}

    @classmethod
    def from_dict(cls, d: dict) -> "Candidate":
        return cls(setting=Setting(**d["setting"]), grad_accum=d["grad_accum"],
                   global_batch=d["global_batch"], memory=MemoryBreakdown.from_dict(d["memory"]),
                   tokens_per_s=d["tokens_per_s"], step_seconds=d["step_seconds"], mfu=d["mfu"])


@dataclass(frozen=True)
class Rejected:
    setting: Setting  # at the smallest micro-batch tried
    reason: str
    needed_gpu_bytes: int
    needed_host_bytes: int

    def to_dict(self) -> dict:
        return {"setting": self.setting.to_dict(), "reason": self.reason,
                "needed_gpu_bytes": self.needed_gpu_bytes, "needed_host_bytes": self.needed_host_bytes}

    @classmethod
    def from_dict(cls, d: dict) -> "Rejected":
        return cls(setting=Setting(**d["setting"]), reason=d["reason"],
                   needed_gpu_bytes=d["needed_gpu_bytes"], needed_host_bytes=d["needed_host_bytes"])


@dataclass(frozen=True)
class Plan:
    model: ModelFacts
    hardware: HardwareFacts
    job: Job
    chosen: Candidate
    ds_buffers: DsBuffers
    usable_gpu_bytes: int
    why: str
    notes: list[str] = field(default_factory=list)
    alternatives: list[Candidate] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)

    @property
    def setting(self) -> Setting:
        return self.chosen.setting

    @property
    def micro_batch(self) -> int:
        return self.chosen.setting.micro_batch

    @property
    def grad_accum(self) -> int:
        return self.chosen.grad_accum

    @property
    def global_batch(self) -> int:
        return self.chosen.global_batch

    @property
    def memory(self) -> MemoryBreakdown:
        return self.chosen.memory

    def to_dict(self) -> dict:
        return {
            "model": self.model.to_dict(), "hardware": self.hardware.to_dict(),
            "job": self.job.to_dict(),
            "setting": self.setting.to_dict(), "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum, "world_size": self.hardware.world,
            "global_batch": self.global_batch,
            "peak_gpu_bytes": self.memory.gpu_total,
            "usable_gpu_bytes": self.usable_gpu_bytes,
            "chosen": self.chosen.to_dict(), "ds_buffers": self.ds_buffers.to_dict(),
            "why": self.why, "notes": list(self.notes),
            "alternatives": [c.to_dict() for c in self.alternatives],
            "rejected": [r.to_dict() for r in self.rejected],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls(model=ModelFacts.from_dict(d["model"]),
                   hardware=HardwareFacts.from_dict(d["hardware"]), job=Job(**d["job"]),
                   chosen=Candidate.from_dict(d["chosen"]), ds_buffers=DsBuffers(**d["ds_buffers"]),
                   usable_gpu_bytes=d["usable_gpu_bytes"], why=d["why"], notes=list(d["notes"]),
                   alternatives=[Candidate.from_dict(c) for c in d["alternatives"]],
                   rejected=[Rejected.from_dict(r) for r in d["rejected"]])


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def plan(model: ModelFacts, hw: HardwareFacts, job: Job, forced: dict | None = None) -> Plan:
    forced = _model_constraints(model, dict(forced or {}))
    _check_inputs(model, hw, job, forced)
    fitting, rejected = [], []
    for setting in candidate_settings(hw, forced):
        result = evaluate(model, hw, job, setting, fixed_micro="micro_batch" in forced)
        (fitting if isinstance(result, Candidate) else rejected).append(result)
        if isinstance(result, Candidate) and "micro_batch" not in forced:
            fitting += _smaller_micro_batches(model, hw, job, result)
    if not fitting:
        raise PtlmError(_nothing_fits_message(model, hw, job, forced, rejected))
    ranked = _rank(fitting)
    best = ranked[0]
    return Plan(model=model, hardware=hw, job=job, chosen=best,
                ds_buffers=ds_buffers(model, hw, best.setting),
                usable_gpu_bytes=usable_gpu_bytes(hw), why=_why(best, ranked, forced),
                notes=_notes(model, hw, job, best),
                alternatives=ranked[1:1 + ALTERNATIVES_SHOWN], rejected=rejected)


def _smaller_micro_batches(model: ModelFacts, hw: HardwareFacts, job: Job,
                           best: Candidate) -> list[Candidate]:
    """The same setting at the smaller micro-batches that still split the global batch exactly.
    Past a few thousand tokens per micro-step the GPU is saturated, so a smaller micro-batch is
    often predicted within TIE_TOLERANCE of the largest: then the ranking prefers the one that
    leaves more memory free (headroom against fragmentation and longer sequences)."""
    if job.global_batch is None:
        return []
    per_gpu = _per_gpu_batch(job, hw.world)
    micro = best.setting.micro_batch
    options = [evaluate(model, hw, job, best.setting.with_(micro_batch=d), fixed_micro=True)
               for d in range(1, micro) if per_gpu % d == 0]
    # accumulation holds gradients through the forward: a smaller micro-batch may not fit
    return [c for c in options if isinstance(c, Candidate)]


def _model_constraints(model: ModelFacts, forced: dict) -> dict:
    """The knobs the architecture itself fixes, added to the forced ones."""
    if not model.chunkable_loss:
        if forced.get("chunked_loss"):
            raise PtlmError(f"{model.name} transforms its logits after the LM head (soft-capping "
                            "or scaling), which the chunked loss does not reproduce: leave "
                            "--chunked-loss off")
        forced["chunked_loss"] = False
    return forced


def _check_inputs(model: ModelFacts, hw: HardwareFacts, job: Job, forced: dict) -> None:
    if hw.world < 1:
        raise PtlmError("no GPU to plan for (none detected here): say which GPUs, e.g. --gpu T4, "
                        "--gpu A100-80GB --gpus 8, or --gpus 1 --gpu-memory 16GiB")
    if model.learned_positions and job.seq_len > model.positions:
        raise PtlmError(f"{model.name} has {model.positions} learned positions: --seq-len "
                        f"{job.seq_len} is longer; use --seq-len {model.positions} or less")
    unknown = set(forced) - set(Setting.__dataclass_fields__)
    if unknown:
        raise PtlmError(f"cannot force {sorted(unknown)}: the knobs are "
                        f"{sorted(Setting.__dataclass_fields__)}")
    if forced.get("precision") == "bf16" and not hw.bf16:
        raise PtlmError(f"{hw.gpu_name} has no bf16: use --precision fp16 (or fp32)")


def candidate_settings(hw: HardwareFacts, forced: dict) -> list[Setting]:
    """Every valid setting (micro-batch 1 unless forced) that honours the forced values."""
    precisions = [p for p in PRECISIONS if hw.bf16 or p != "bf16"]
    space = {"precision": precisions, "zero": ZERO_STAGES, "offload": OFFLOADS,
             "checkpointing": (False, True), "optimizer": OPTIMIZERS, "chunked_loss": (True, False)}
    for name, value in forced.items():
        if name != "micro_batch":
            space[name] = (value,)
    micro = forced.get("micro_batch", 1)
    settings, errors = [], []
    for values in itertools.product(*space.values()):
        try:
            settings.append(Setting(**dict(zip(space, values)), micro_batch=micro))
        except PtlmError as e:  # an invalid combination: skipped, unless nothing else is left
            errors.append(str(e))
    if not settings:
        raise PtlmError(f"the forced setting is invalid: {errors[0]}")
    return settings


def evaluate(model: ModelFacts, hw: HardwareFacts, job: Job, setting: Setting,
             fixed_micro: bool = False) -> Candidate | Rejected:
    """The candidate for `setting` at its best micro-batch, or why it does not fit."""
    if fixed_micro:
        largest = 0 if _fit_problem(model, hw, job, setting) else setting.micro_batch
    else:
        largest = _largest_fitting_micro(model, hw, job, setting)
    if not largest:
        smallest = setting if fixed_micro else setting.with_(micro_batch=1)
        mem = estimate(model, hw, job, smallest)
        problem = _fit_problem(model, hw, job, smallest)
        return Rejected(smallest, problem, mem.needed_bytes, mem.host_total)
    if fixed_micro:
        return at_micro_batch(model, hw, job, setting)
    micro, accum, global_batch = _split_batch(job, hw.world, largest)
    return _candidate(model, hw, job, setting.with_(micro_batch=micro), accum, global_batch)


def at_micro_batch(model: ModelFacts, hw: HardwareFacts, job: Job, setting: Setting) -> Candidate:
    """The candidate for `setting` at its own micro-batch, accumulation making up the job's global
    batch, whether or not the memory model says it fits: evaluate's figures for a fixed
    micro-batch, also for one a run chose by measuring (an out-of-memory back-off)."""
    accum, global_batch = _accumulation(job, hw.world, setting.micro_batch)
    return _candidate(model, hw, job, setting, accum, global_batch)



def with_micro_batch(p: Plan, micro: int, global_batch: int | None = None) -> Plan:
    """`p` at another micro-batch, accumulation making up its global batch (or `global_batch`),
    its memory and tokens/s evaluated again for that micro-batch: the plan of a run that backed
    off after running out of memory, of a resume at the checkpoint's micro-batch, of a probe
    trial. The planner's own choice is noted when the micro-batch differs from it."""
    global_batch = global_batch or p.global_batch
    per_rank = global_batch // p.hardware.world
    if micro < 1 or per_rank % micro:
        raise PtlmError(f"micro-batch {micro} does not divide the {per_rank} sequences per rank")
    job = replace(p.job, global_batch=global_batch)  # the global batch trained, not the asked
    chosen = at_micro_batch(p.model, p.hardware, job, p.setting.with_(micro_batch=micro))
    note = (f"micro-batch {micro} (planned {p.micro_batch}) was set by the run: an "
            "out-of-memory back-off, or the resumed checkpoint's")
    return replace(p, chosen=chosen,
                   notes=[*p.notes, note] if micro != p.micro_batch else list(p.notes))

def _candidate(model: ModelFacts, hw: HardwareFacts, job: Job, chosen: Setting, accum: int,
               global_batch: int) -> Candidate:
    step = step_seconds(model, hw, job, chosen, accum)
    tokens = global_batch * job.seq_len
    return Candidate(chosen, accum, global_batch, estimate(model, hw, job, chosen),
                     tokens / step, step, _mfu(model, hw, job, chosen, tokens / step))


def _fit_problem(model: ModelFacts, hw: HardwareFacts, job: Job, setting: Setting) -> str:
    """'' when `setting` fits, else the reason it does not."""
    mem = estimate(model, hw, job, setting)
    usable = usable_gpu_bytes(hw)
    if mem.needed_bytes > usable:
        return (f"{setting.describe()}: needs {mem.needed_bytes / GiB:.1f} GiB > "
                f"{usable / GiB:.1f} GiB usable per GPU")
    if hw.host_memory_bytes is not None and mem.host_total > hw.host_memory_bytes:
        return (f"{setting.describe()}: needs {mem.host_total / GiB:.0f} GiB host RAM per node > "
                f"{hw.host_memory_bytes / GiB:.0f} GiB")
    return ""


def _largest_fitting_micro(model: ModelFacts, hw: HardwareFacts, job: Job, setting: Setting) -> int:
    """The largest micro-batch that fits, 0 if none. The whole per-GPU batch (no accumulation, so
    no gradients held through the forward) is tried on its own; below it, memory grows with the
    micro-batch: binary search."""
    if job.global_batch is None:
        cap = job.max_micro_batch
    else:
        cap = _per_gpu_batch(job, hw.world)
        if not _fit_problem(model, hw, job, setting.with_(micro_batch=cap)):
            return cap
        cap -= 1
    if cap < 1 or _fit_problem(model, hw, job, setting.with_(micro_batch=1)):
        return 0
    low, high = 1, cap
    while low < high:
        mid = (low + high + 1) // 2
        if _fit_problem(model, hw, job, setting.with_(micro_batch=mid)):
            high = mid - 1
        else:
            low = mid
    return low


# ----------------------------------------------------------------------------------------------
# Global batch = micro-batch × accumulation × GPUs
# ----------------------------------------------------------------------------------------------

def _per_gpu_batch(job: Job, world: int) -> int:
    """Sequences per GPU per step: the requested global batch over the GPUs, rounded half up."""
    return max(1, math.floor(job.global_batch / world + 0.5))


def _split_batch(job: Job, world: int, largest_micro: int) -> tuple[int, int, int]:
    """(micro, accumulation, effective global): the largest micro-batch that divides the per-GPU
    batch exactly, so the global batch is met whenever the GPU count divides it."""
    if job.global_batch is None:
        return largest_micro, 1, largest_micro * world
    per_gpu = _per_gpu_batch(job, world)
    micro = max(d for d in range(1, min(per_gpu, largest_micro) + 1) if per_gpu % d == 0)
    return micro, per_gpu // micro, per_gpu * world


def _accumulation(job: Job, world: int, micro: int) -> tuple[int, int]:
    """For a forced micro-batch: (accumulation, effective global batch)."""
    if job.global_batch is None:
        return 1, micro * world
    accum = max(1, math.ceil(job.global_batch / (micro * world)))
    return accum, micro * accum * world


# ----------------------------------------------------------------------------------------------
# Cost model
# ----------------------------------------------------------------------------------------------

def step_seconds(model: ModelFacts, hw: HardwareFacts, job: Job, s: Setting, accum: int) -> float:
    micro = _compute_seconds(model, hw, job, s) + _micro_comm_seconds(model, hw, s)
    micro += _micro_pcie_seconds(model, hw, s)
    return accum * micro + _optimizer_step_seconds(model, hw, s)


def _compute_seconds(model: ModelFacts, hw: HardwareFacts, job: Job, s: Setting) -> float:
    peak = peak_flops(s.precision, hw.peak_tflops, hw.fp32_tflops)
    recompute = CHECKPOINTING_COMPUTE_FACTOR if s.checkpointing else 1.0
    flops = s.micro_batch * job.seq_len * flops_per_token(model, job.seq_len) * recompute
    overhead = model.layers * LAYER_OVERHEAD_S * recompute
    if s.zero == 3:
        overhead += model.layers * ZERO3_LAYER_OVERHEAD_S
    return flops / (peak * MFU_CEILING) + overhead


def _bus_bandwidth(hw: HardwareFacts) -> float:
    return hw.interconnect_bandwidth if hw.nodes == 1 else min(hw.interconnect_bandwidth,
                                                               INTER_NODE_BYTES_PER_S)


def _gather_passes(s: Setting) -> int:
    """ZeRO-3 gathers the weights for the forward, the backward and any recomputed forward."""
    return 3 if s.checkpointing else 2


def _micro_comm_seconds(model: ModelFacts, hw: HardwareFacts, s: Setting) -> float:
    if hw.world == 1 or s.zero < 2:
        return 0.0
    one_pass = (hw.world - 1) / hw.world * model.parameters * PRECISION_BYTES[s.precision]
    passes = 1 if s.zero == 2 else 1 + _gather_passes(s)  # reduce-scatter (+ gathers)
    return passes * one_pass / _bus_bandwidth(hw)


def _micro_pcie_seconds(model: ModelFacts, hw: HardwareFacts, s: Setting) -> float:
    local = model.parameters * PRECISION_BYTES[s.precision] / hw.world
    if s.offload == "none":
        return 0.0
    passes = 1  # gradients down to the host
    if s.offload == "parameters":
        passes += _gather_passes(s)  # the weights come up for every pass
    return passes * local / hw.pcie_bandwidth


def _optimizer_step_seconds(model: ModelFacts, hw: HardwareFacts, s: Setting) -> float:
    w = PRECISION_BYTES[s.precision]
    local = model.parameters / (hw.world if s.zero >= 1 else 1)
    seconds = 0.0
    if hw.world > 1 and s.zero < 3:  # ZeRO-0/1 all-reduce, ZeRO-1/2 all-gather of the weights
        factor = 2 if s.zero < 2 else 1
        seconds += factor * (hw.world - 1) / hw.world * model.parameters * w / _bus_bandwidth(hw)
    if s.offload == "none":
        return seconds + local * ADAMW_STEP_BYTES_PER_PARAM[s.optimizer] / hw.memory_bandwidth
    cpu_adam = local * hw.gpus_per_node / CPU_ADAM_PARAMS_PER_S
    return seconds + cpu_adam + local * w / hw.pcie_bandwidth  # updated weights back up


def _mfu(model: ModelFacts, hw: HardwareFacts, job: Job, s: Setting, tokens_per_s: float) -> float:
    """The predicted MFU (ptlm.plan.mfu: against the peak of the setting's precision)."""
    return mfu(tokens_per_s, flops_per_token(model, job.seq_len),
               peak_flops(s.precision, hw.peak_tflops, hw.fp32_tflops), hw.world)


# ----------------------------------------------------------------------------------------------
# Ranking and explanations
# ----------------------------------------------------------------------------------------------
PRECISION_PREFERENCE = {"bf16": 0, "fp16": 1, "fp32": 2}  # fp16 needs loss scaling


# With optimizer offload, ZeRO-2 is the configuration ZeRO-Offload was built and documented on.
OFFLOAD_ZERO_PREFERENCE = {2: 0, 1: 1, 3: 2}


def _preference(c: Candidate) -> tuple:
    """Among equally fast settings, the least intrusive: no offload, lower ZeRO stage (ZeRO-2
    with optimizer offload), exact AdamW, bf16, chunked loss (ptlm's default), no checkpointing,
    then less memory."""
    s = c.setting
    zero = OFFLOAD_ZERO_PREFERENCE[s.zero] if s.offload == "optimizer" else s.zero
    return (s.offload != "none", zero, s.optimizer != "adamw", PRECISION_PREFERENCE[s.precision],
            not s.chunked_loss, s.checkpointing, c.memory.gpu_total)


def _score(c: Candidate) -> float:
    """Predicted tokens/s, discounted for settings we only want when they clearly pay."""
    return c.tokens_per_s * (1 - ADAMW8BIT_DISCOUNT if c.setting.optimizer == "adamw8bit" else 1)


def _rank(fitting: list[Candidate]) -> list[Candidate]:
    best = max(_score(c) for c in fitting)
    ties = [c for c in fitting if _score(c) >= best * (1 - TIE_TOLERANCE)]
    rest = [c for c in fitting if _score(c) < best * (1 - TIE_TOLERANCE)]
    return sorted(ties, key=_preference) + sorted(rest, key=lambda c: -_score(c))


# What each _preference key means, for the "why" when it broke a tie.
PREFERENCE_REASONS = ("no CPU offload", "the lower ZeRO stage", "exact AdamW",
                      "the preferred precision", "the chunked loss", "no activation checkpointing",
                      "less GPU memory")


def _why(best: Candidate, ranked: list[Candidate], forced: dict) -> str:
    scope = "the forced setting" if forced else "all settings"
    runner = ranked[1] if len(ranked) > 1 else None
    delta = runner.tokens_per_s / best.tokens_per_s - 1 if runner else 0.0
    head = "fastest predicted of" if delta <= 0 else "chosen among"
    text = (f"{head} {len(ranked)} fitting candidates ({scope}; 8-bit Adam "
            f"discounted {ADAMW8BIT_DISCOUNT:.0%}): {best.tokens_per_s:,.0f} tokens/s at "
            f"micro-batch {best.setting.micro_batch}")
    if runner is None:
        return text
    text += (f"; next: {runner.setting.describe()} at {runner.tokens_per_s:,.0f} tokens/s "
             f"({delta:+.0%})")
    if abs(delta) <= TIE_TOLERANCE:
        text += (f"; within the model's precision ({TIE_TOLERANCE:.0%}), so the tie goes to "
                 f"{_tie_break(best, runner)}")
    return text


def _tie_break(best: Candidate, runner: Candidate) -> str:
    """The first _preference key on which `best` beat `runner`, in words."""
    for reason, mine, theirs in zip(PREFERENCE_REASONS, _preference(best), _preference(runner)):
        if mine != theirs:
            if reason == "less GPU memory":
                return (f"{reason} ({mine / GiB:.1f} GiB against {theirs / GiB:.1f} GiB: "
                        "headroom for fragmentation and longer batches)")
            return reason
    return "the first in the ranking (equal on every preference)"


def _notes(model: ModelFacts, hw: HardwareFacts, job: Job, best: Candidate) -> list[str]:
    notes = []
    s = best.setting
    if job.global_batch is None:
        notes.append(f"no global batch requested: using the largest micro-batch that fits (capped "
                     f"at {job.max_micro_batch}) with no accumulation -> global batch "
                     f"{best.global_batch}")
    elif best.global_batch != job.global_batch:
        notes.append(f"global batch {job.global_batch} cannot be split exactly over {hw.world} GPU(s)"
                     f" with micro-batch {s.micro_batch}: using {best.global_batch} = {s.micro_batch}"
                     f" × {best.grad_accum} accumulation × {hw.world} GPU(s)")
    if s.precision == "fp16":
        notes.append("fp16 trains with dynamic loss scaling (DeepSpeed); bf16 is safer where the "
                     "GPU has it")
    if s.optimizer == "adamw8bit":
        notes.append("adamw8bit: bitsandbytes optimizer passed to DeepSpeed as a client optimizer "
                     "(zero_allow_untested_optimizer)")
    if s.offload != "none":
        notes.append("CPU offload uses DeepSpeed's CPU-Adam (built on first use) and pinned host "
                     "memory; check host RAM figures")
    if not hw.known_gpu:
        notes.append(f"{hw.gpu_name}: not in the GPU table, so tokens/s are relative figures only")
    if not model.learned_positions and job.seq_len > model.positions:
        notes.append(f"seq {job.seq_len} is longer than the {model.positions} positions "
                     f"{model.name} was trained with: its position encoding has no table to run "
                     "out of, but quality past that length is not what it was trained for")
    if not model.chunkable_loss:
        notes.append(f"{model.name} soft-caps or scales its logits after the LM head: the loss "
                     "runs unchunked (full logits)")
    if model.activations is not None:
        notes.append("activation memory measured from the model's own forward and backward "
                     "(FakeTensorMode), not from a hand formula")
    return notes


def _nothing_fits_message(model: ModelFacts, hw: HardwareFacts, job: Job, forced: dict,
                          rejected: list[Rejected]) -> str:
    usable = usable_gpu_bytes(hw)
    scope = f"the forced setting ({forced})" if forced else "any setting"
    lines = [f"{model.name} ({_count(model.parameters)} parameters) at seq {job.seq_len} does "
             f"not fit on {hw.describe()}"
             + (f" with {hw.host_memory_bytes / GiB:.0f} GiB host RAM" if hw.host_memory_bytes else "")
             + f" with {scope}."]
    single = len(rejected) == 1
    if single:
        lines.append(rejected[0].reason + ".")
    ways = []
    host_ok = [r for r in rejected if hw.host_memory_bytes is None
               or r.needed_host_bytes <= hw.host_memory_bytes]
    if host_ok:
        lean = min(host_ok, key=lambda r: r.needed_gpu_bytes)
        if not single:
            lines.append(f"Leanest within host RAM: {lean.setting.describe()} needs "
                         f"{lean.needed_gpu_bytes / GiB:.1f} GiB per GPU ({usable / GiB:.1f} GiB "
                         "usable).")
        ways.append(f"a GPU with >= {(lean.needed_gpu_bytes + gpu_fixed_bytes(hw)) / GiB:.0f} GiB")
    gpu_ok = [r for r in rejected if r.needed_gpu_bytes <= usable]
    if gpu_ok:
        lean = min(gpu_ok, key=lambda r: r.needed_host_bytes)
        if not single:
            lines.append(f"Leanest on the GPU: {lean.setting.describe()} fits the GPU but needs "
                         f"{lean.needed_host_bytes / GiB:.0f} GiB host RAM per node.")
        ways.append(f">= {lean.needed_host_bytes / GiB:.0f} GiB host RAM per node (CPU offload)")
    if forced.get("micro_batch", 1) > 1:
        ways.append("a smaller --micro-batch (accumulation keeps the global batch)")
    scaled = _smallest_scale_out(model, hw, job, forced)
    if scaled:
        ways.append(f"{scaled.nodes} machines like this one ({scaled.world} GPUs in all, ZeRO "
                    f"shards the model states across them)")
    lines.append("Options: " + "; or ".join(ways) + ".")
    return " ".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _smallest_scale_out(model: ModelFacts, hw: HardwareFacts, job: Job,
                        forced: dict) -> HardwareFacts | None:
    """The fewest nodes like this one on which some (forced) setting fits, or None."""
    nodes = hw.nodes * 2
    while nodes <= hw.nodes * MAX_SCALE_OUT:
        bigger = replace(hw, nodes=nodes)
        for setting in candidate_settings(bigger, forced):
            if not _fit_problem(model, bigger, job, setting):
                return bigger
        nodes *= 2
    return None

