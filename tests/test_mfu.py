"""One MFU (ptlm.plan.mfu): the plan's prediction and the run's logged figure are the same
quantity, checked against numbers worked out by hand."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from ptlm.model.config import model_facts
from ptlm.plan.facts import KNOWN_GPUS, GiB, HardwareFacts
from ptlm.plan.memory import Job
from ptlm.plan.mfu import flops_per_token, mfu, peak_flops
from ptlm.plan.planner import MFU_CEILING, plan

# OPT-125M by hand: token embeddings 50,272 x 768 (tied to the LM head) + 2,050 x 768 learned
# positions, 12 layers of 7,087,872 (q, k, v, out: 768 x 768 + 768 each; fc1 768 x 3,072 + 3,072;
# fc2 3,072 x 768 + 768; two LayerNorms of 2 x 768) and the final LayerNorm (2 x 768).
OPT125_PARAMETERS = 50_272 * 768 + 2_050 * 768 + 12 * 7_087_872 + 2 * 768  # 125,239,296
# 6·N + 12·L·h·s at seq 1024 (PaLM App. B)
OPT125_FLOPS_PER_TOKEN_1024 = 6 * 125_239_296 + 12 * 12 * 768 * 1024  # 864,681,984
T4_FP32_FLOPS = 8.1e12  # NVIDIA T4 datasheet: 8.1 TFLOPS single precision
T4_FP16_FLOPS = 65e12  # 65 TFLOPS mixed-precision tensor cores


def test_peak_is_the_one_of_the_precision_used():
    assert peak_flops("fp32", 65, 8.1) == pytest.approx(T4_FP32_FLOPS)
    assert peak_flops("fp16", 65, 8.1) == pytest.approx(T4_FP16_FLOPS)
    assert peak_flops("bf16", 312, 19.5) == pytest.approx(312e12)
    with pytest.raises(ValueError, match="fp8"):
        peak_flops("fp8", 65, 8.1)
    # 10,000 tokens/s of a 1 GFLOP/token model on 2 devices of 10 TFLOP/s: 1e13 / 2e13
    assert mfu(10_000, 1e9, 10e12, 2) == pytest.approx(0.5)


def test_opt125m_fp32_on_a_t4_the_plan_and_the_run_say_the_same(tmp_path):
    from ptlm.run import report, state, trainer

    facts = model_facts("opt-125m")
    assert facts.parameters == OPT125_PARAMETERS == 125_239_296
    assert flops_per_token(facts, 1024) == OPT125_FLOPS_PER_TOKEN_1024
    t4 = HardwareFacts.from_spec(KNOWN_GPUS["T4"], 1, host_memory_bytes=64 * GiB)
    p = plan(facts, t4, Job(1024, 16), {"precision": "fp32"})
    tps = p.chosen.tokens_per_s
    want = tps * OPT125_FLOPS_PER_TOKEN_1024 / T4_FP32_FLOPS
    assert p.chosen.mfu == pytest.approx(want, rel=1e-9)
    # against the 16-bit peak it would read 8x less (the planner's old figure, ~5%)
    assert want / (tps * OPT125_FLOPS_PER_TOKEN_1024 / T4_FP16_FLOPS) == pytest.approx(65 / 8.1)
    assert 0.2 < p.chosen.mfu <= MFU_CEILING  # what the cost model allows at most

    # The run: trainer.setup's figures on a GPU (flops per token of the plan's model, the peak
    # of the plan's precision), then log_step for a step at the plan's tokens/s.
    run = SimpleNamespace(
        state=state.RunState(step=1, micro_batch=p.micro_batch), plan=p,
        val=SimpleNamespace(seq_len=1024), loader=SimpleNamespace(epoch=0),
        engine=SimpleNamespace(get_lr=lambda: [1e-4], get_global_grad_norm=lambda: 1.0),
        state_grad_norm=1.0, dist=SimpleNamespace(world_size=1), total_steps=1,
        cfg=SimpleNamespace(log_every=1), metrics=report.MetricsLog(tmp_path, True),
        flops_per_token=flops_per_token(p.model, 1024),
        peak_flops=peak_flops(p.setting.precision, p.hardware.peak_tflops,
                              p.hardware.fp32_tflops))
    trainer.log_step(run, loss=1.0, seconds=p.global_batch * 1024 / tps, bar=None)
    run.metrics.close()
    (record,) = [json.loads(x) for x in (tmp_path / report.METRICS).read_text().splitlines()]
    assert record["tokens_per_s"] == pytest.approx(tps)
    assert record["mfu"] == pytest.approx(want, rel=1e-9)
