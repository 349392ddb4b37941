"""The memory model's accuracy goal, on the real OPT-125M and GPT-2 124M configs: predicted peak
within ±10% of a real step measured under FakeTensorMode + MemTracker, over bench/bench_memory.py's
grid of 18 settings (~3 min, so slow). tests/test_memory.py checks small models by default."""

import importlib.util

import pytest

from tests.support import ROOT


def grid():
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "bench" / "bench_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = grid()


@pytest.mark.slow
@pytest.mark.parametrize("alias, seq_len, setting", BENCH.GRID,
                         ids=[f"{a}-{s}-{x.describe()}" for a, s, x in BENCH.GRID])
def test_predicted_peak_within_ten_percent(alias, seq_len, setting):
    predicted, measured = BENCH.measure(alias, seq_len, setting)
    assert predicted == pytest.approx(measured, rel=BENCH.TOLERANCE)


def test_grid_spans_what_the_goal_asks():
    settings = [s for _, _, s in BENCH.GRID]
    assert len(BENCH.GRID) >= 16
    assert {a for a, _, _ in BENCH.GRID} == {"opt-125m", "gpt2"}
    assert min(q for _, q, _ in BENCH.GRID) <= 128 and max(q for _, q, _ in BENCH.GRID) >= 2048
    assert {s.micro_batch for s in settings} >= {1, 16}
    for knob, values in (("checkpointing", {True, False}), ("precision", {"fp32", "bf16"}),
                         ("optimizer", {"adamw", "adamw8bit"}), ("chunked_loss", {True, False})):
        assert {getattr(s, knob) for s in settings} == values
