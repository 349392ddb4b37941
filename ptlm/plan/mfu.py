"""Model FLOPs utilization (MFU): one definition for the plan (ptlm.plan.planner), the run's
metrics (ptlm.run.trainer), and the benchmarks (bench/gpu_check.py).

    MFU = tokens/s × model FLOPs per token / (devices × the device's peak FLOP/s for the precision
          the step runs in)

- Model FLOPs per token = 6·N + 12·L·h·s (PaLM, Chowdhery et al. 2022, Appendix B; nanoGPT's
  `estimate_mfu`): forward + backward of every parameter and of attention, without the
  recomputation of activation checkpointing (that is hardware FLOPs, not model FLOPs).
- The peak is the one the step can reach: the dense 16-bit tensor-core peak for bf16/fp16, plain
  fp32 for fp32 (torch does not use TF32 for fp32 matmuls by default). PaLM divides by the peak
  of the arithmetic the run uses (bf16 there). Dividing an fp32 run by the 16-bit peak would
  measure the choice of precision, not how well the step uses the device: OPT-125M in fp32 on a
  T4 would read ~5% at its best, where 40% is the ceiling the planner's cost model assumes for
  every precision (planner.MFU_CEILING). With the precision's peak, the plan's predicted MFU and
  the run's measured one are the same quantity, comparable with that ceiling. Tokens/s, not MFU,
  is what ranks settings of different precisions.
"""

from __future__ import annotations

from ptlm.plan.facts import ModelFacts

TERA = 1e12
# Training FLOPs per token = 6·N + 12·L·h·s (PaLM App. B; llm.c's Kaplan form 6·N + 6·L·h·s is
# ~7% lower at s = 1024). N counts every parameter, so the tied LM head's matmul is in it.
FLOPS_PER_PARAM_PER_TOKEN = 6
ATTENTION_FLOPS_PER_LAYER_HIDDEN_TOKEN = 12
SIXTEEN_BIT = ("bf16", "fp16")


def flops_per_token(model: ModelFacts, seq_len: int) -> float:
    """Model FLOPs to train `model` on one token (forward + backward) at sequence length seq_len."""
    return (FLOPS_PER_PARAM_PER_TOKEN * model.parameters
            + ATTENTION_FLOPS_PER_LAYER_HIDDEN_TOKEN * model.layers * model.hidden * seq_len)


def peak_flops(precision: str, peak_tflops: float, fp32_tflops: float) -> float:
    """One device's peak FLOP/s for `precision`: `peak_tflops` (the dense 16-bit tensor-core
    figure) for bf16/fp16, `fp32_tflops` for fp32 (ptlm.plan.facts.GpuSpec's two figures)."""
    if precision in SIXTEEN_BIT:
        return peak_tflops * TERA
    if precision == "fp32":
        return fp32_tflops * TERA
    raise ValueError(f"unknown precision {precision!r}: one of fp32, {', '.join(SIXTEEN_BIT)}")


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops_per_device: float,
        devices: int) -> float:
    """Model FLOPs utilization: the model FLOP/s achieved over what `devices` devices peak at."""
    return tokens_per_s * flops_per_token / (devices * peak_flops_per_device)
