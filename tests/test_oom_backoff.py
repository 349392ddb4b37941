"""OOM back-off for real: an out-of-memory error in the middle of a backward (gradients partly
accumulated, partly reduced) with accumulation 2 on 2 CPU ranks, under ZeRO 0, 2 and 3. After
the back-off every later step must be exactly what a run planned at the halved micro-batch from
the start computes: same global batch, same blocks, nothing of the failed step left behind."""

from __future__ import annotations

import pytest

from ptlm.run.machine import faults
from bench import matrix_reference as mx
from tests.support import losses, records
from tests.support import train as train_run

COMMON = ["--global-batch", 8, "--max-steps", 6, "--no-export"]
OOM_AT = "3:2:backward"  # optimizer step 3, second micro-step, mid-backward


def train(*args, **kw):
    return train_run(*args, scratch=False, **kw)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Saved weights (ZeRO-3 builds a --from-scratch model partitioned, with other random draws)."""
    return mx.make_init(tmp_path_factory.mktemp("oom_model") / "opt")


@pytest.fixture(scope="module")
def halved(tmp_path_factory, demo_dataset, model):
    """The uninterrupted run at micro-batch 1 (accumulation 4), ZeRO-0."""
    out = tmp_path_factory.mktemp("oom") / "halved"
    train(demo_dataset, out, model, *COMMON, "--micro-batch", 1, ranks=2)
    return losses(out)


def _check_backed_off(out, reference):
    assert records(out, "oom_backoff") == [
        {"kind": "oom_backoff", "step": 2, "micro_batch": 1, "grad_accum": 4}]
    assert [r["micro_batch"] for r in records(out, "train")] == [2, 2, 1, 1, 1, 1]
    assert losses(out) == pytest.approx(reference, rel=1e-5, abs=1e-6)  # every step, not a prefix


@pytest.mark.parametrize("zero", [0, 3])
def test_oom_mid_backward_then_every_step_matches_the_halved_run(tmp_path, demo_dataset, model,
                                                                  halved, zero):
    out = tmp_path / "oom"
    train(demo_dataset, out, model, *COMMON, "--micro-batch", 2, "--zero", zero, ranks=2,
          env={faults.OOM_ENV: OOM_AT})
    _check_backed_off(out, halved)


def test_oom_mid_backward_zero2_then_kill_and_resume_keeps_the_backed_off_batch(
        tmp_path, demo_dataset, model, halved):
    """ZeRO-2 (buckets reduced during the backward), then killed after step 5 and resumed from
    the step-4 checkpoint: the resumed run goes on at the backed-off micro-batch, engine, loader
    and records agreeing (the run refuses to step when they do not), the same losses."""
    out = tmp_path / "oom_z2"
    args = [*COMMON, "--micro-batch", 2, "--zero", 2, "--save-every", 4]
    r = train(demo_dataset, out, model, *args, ranks=2, check=False,
              env={faults.OOM_ENV: OOM_AT, faults.KILL_AFTER_STEP_ENV: "5"})
    assert r.returncode != 0
    assert [r["micro_batch"] for r in records(out, "train")] == [2, 2, 1, 1, 1]
    assert losses(out) == pytest.approx(halved[:5], rel=1e-5, abs=1e-6)
    r = train(demo_dataset, out, model, *args, ranks=2)
    assert "backed off to micro-batch 1" in r.stderr
    _check_backed_off(out, halved)


def test_oom_in_engine_step_backs_off(tmp_path, demo_dataset, model, halved):
    out = tmp_path / "oom_step"
    train(demo_dataset, out, model, *COMMON, "--micro-batch", 2, "--zero", 1, ranks=2,
          env={faults.OOM_ENV: "3:2:step"})
    _check_backed_off(out, halved)


def test_the_plan_after_a_micro_batch_change_is_evaluated_at_that_micro_batch():
    """The plan a backed-off run saves (and resumes with) carries the halved micro-batch's
    memory and tokens/s, as the planner predicts them for that micro-batch forced, not the
    planned micro-batch's figures under the new batch split."""
    from ptlm.model.config import model_facts
    from ptlm.plan.facts import KNOWN_GPUS, GiB, HardwareFacts
    from ptlm.plan.memory import Job
    from ptlm.plan.planner import Plan, plan
    from ptlm.plan.planner import with_micro_batch

    facts = model_facts("opt-125m")
    t4 = HardwareFacts.from_spec(KNOWN_GPUS["T4"], 1, host_memory_bytes=64 * GiB)
    planned = plan(facts, t4, Job(1024, 16))
    assert (planned.micro_batch, planned.grad_accum) == (8, 2)
    halved = with_micro_batch(planned, 4)
    forced = plan(facts, t4, Job(1024, 16), planned.setting.with_(micro_batch=4).to_dict())
    assert halved.chosen == forced.chosen
    assert (halved.micro_batch, halved.grad_accum, halved.global_batch) == (4, 4, 16)
    assert halved.memory.activations < planned.memory.activations
    assert halved.chosen.tokens_per_s < planned.chosen.tokens_per_s
    assert "micro-batch 4 (planned 8)" in halved.notes[-1]
    assert Plan.from_dict(halved.to_dict()).chosen == halved.chosen  # what a checkpoint keeps
