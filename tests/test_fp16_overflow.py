"""fp16 gradient overflow, injected, on 2 CPU ranks at ZeRO-0 (DeepSpeed's fp16 wrapper) and
ZeRO-2 (a ZeRO optimizer): rank 0 puts an inf into one gradient at steps 2 and 3
(tests/cpu_fp16/sitecustomize.py, PTLM_TEST_INF_GRAD). What must happen, as the plain-PyTorch
reference (bench/matrix_reference.py, Recipe.skip_steps) and DeepSpeed's loss-scale rules say:

    every rank skips the update   the weights, the optimizer's state and the LR schedule do not
                                  move; the batch is consumed (the losses follow the reference
                                  that skips those updates, not the one that does not)
    the loss scale backs off      halved at each overflow at ZeRO-0; at ZeRO-1/2 the first
                                  overflow only spends the hysteresis (ptlm's config: 2)
    the logs say so               a warning on every rank, with the scale before and after
    a checkpoint after it         step 4's: the run killed after step 6 resumes from it and redoes
                                  steps 5-6 bit for bit; it holds the backed-off scale
"""

from __future__ import annotations

import re

import pytest
import torch

from ptlm.plan.dsconfig import FP16_HYSTERESIS, FP16_INITIAL_SCALE_POWER
from bench import matrix_reference as mx

OVERFLOW_STEPS = (2, 3)  # two in a row: ZeRO-2's hysteresis absorbs the first
CHECKPOINT = f"step{mx.SAVE_EVERY:08d}"  # the one the killed run is resumed from


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    return mx.make_init(tmp_path_factory.mktemp("overflow") / "init")


def expected_scales(zero: int) -> list[tuple[float, float]]:
    """(loss scale before, after) at each overflow: DeepSpeed's ZeRO-0 fp16 wrapper halves the
    scale at every overflow; its ZeRO optimizers' DynamicLossScaler first spends the config's
    hysteresis (not refilled by good steps: consecutive_hysteresis is off)."""
    scale, hysteresis, out = float(2 ** FP16_INITIAL_SCALE_POWER), FP16_HYSTERESIS, []
    for _ in OVERFLOW_STEPS:
        before = scale
        if zero > 0 and hysteresis > 1:
            hysteresis -= 1
        else:
            scale /= 2
        out.append((before, scale))
    return out


def saved_loss_scales(checkpoint) -> list[float]:
    """The loss scale each rank's optimizer state holds in a DeepSpeed checkpoint."""
    def load(path):
        return torch.load(path, map_location="cpu", weights_only=False)

    zero_files = sorted(checkpoint.glob("zero_pp_rank_*_optim_states.pt"))
    if zero_files:  # ZeRO-1/2: one optimizer partition, with its scaler, per rank
        return [load(f)["optimizer_state_dict"]["loss_scaler"].cur_scale for f in zero_files]
    return [load(checkpoint / "mp_rank_00_model_states.pt")["optimizer"]["cur_scale"]]


@pytest.mark.parametrize("zero", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_an_fp16_overflow_skips_the_step_on_every_rank(tmp_path, demo_dataset, init, zero):
    setting = mx.MatrixSetting("fp16", zero, "none", False, "adamw", True, 1)
    out = tmp_path / "run"
    row = mx.run_setting(setting, init, demo_dataset, out, overflow_steps=OVERFLOW_STEPS)
    assert "error" not in row, row.get("error")

    # the losses follow the reference that skipped steps 2-3's updates, not the one that did not
    plain = mx.reference_for(init, demo_dataset, "adamw")["losses"]
    assert row["max_dev"] <= row["tolerance"], row
    assert max(abs(a - b) for a, b in zip(row["losses"], plain)) > 5 * row["tolerance"]
    # the LR schedule stood still at the skipped steps, as the reference's did
    ref_lrs = mx.reference_for(init, demo_dataset, "adamw", OVERFLOW_STEPS)["lrs"]
    records = mx.train_records(out / "metrics.jsonl")
    assert [records[k]["lr"] for k in range(1, mx.STEPS + 1)] == pytest.approx(ref_lrs, rel=1e-6)
    # a checkpoint taken after the overflows resumes exactly, with the backed-off scale
    assert row["resume_ok"] and row["export_ok"], row
    final_scale = expected_scales(zero)[-1][1]
    assert saved_loss_scales(out / "checkpoints" / CHECKPOINT) == \
        [final_scale] * (mx.RANKS if zero else 1)
    saved = torch.load(out / "checkpoints" / CHECKPOINT / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)
    assert saved["skipped_steps"] == len(OVERFLOW_STEPS)
    assert saved["lr_scheduler"]["last_epoch"] == mx.SAVE_EVERY - len(OVERFLOW_STEPS)

    # every rank says so (the injection was on rank 0 only), with the scale before and after
    for rank in range(mx.RANKS):
        text = (tmp_path / f"run.rank{rank}.log").read_text()
        said = [(int(step), float(a), float(b)) for step, a, b in re.findall(
            r"fp16 gradient overflow in optimizer step (\d+): update skipped.*loss scale "
            r"(\S+) -> (\S+)", text)]
        assert said == [(step, a, b) for step, (a, b) in zip(OVERFLOW_STEPS,
                                                              expected_scales(zero))], text[-3000:]
