"""The setting matrix, trained for real: DeepSpeed's CPU accelerator, 2 gloo ranks, every value of
every axis the planner can return (precision, ZeRO stage, offload, checkpointing, optimizer,
chunked loss, accumulation). Each setting starts from the same saved model, runs 8 steps that
must match a plain single-process PyTorch reference (bench/matrix_reference.py), is SIGKILLed
after step 6 and resumed from its step-4 checkpoint (steps 5-6 redone bit for bit), and exports
a model that plain transformers reloads with the run's own val perplexity.

The default suite runs the pairwise subset (every value at least once, the risky pairs); the
full product runs with --run-slow, or as `python bench/bench_matrix.py` (docs/benchmarks.md)."""

from __future__ import annotations

import pytest

from bench import matrix_reference as mx


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    return mx.make_init(tmp_path_factory.mktemp("matrix") / "init")


def _check(row):
    assert "error" not in row, row.get("error")
    detail = (f"{row['setting']}: losses {row['losses']}\nreference {row['reference']}\n"
              f"redone {row['redone']}; run ppl {row['run_ppl']}, export ppl {row['export_ppl']}")
    assert row["max_dev"] <= row["tolerance"], detail
    assert row["resume_ok"], detail
    assert row["export_ok"], detail


def _tiny_config():
    from transformers import OPTConfig

    return OPTConfig(vocab_size=1024, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                     num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64)


def _cpu_plan(monkeypatch, bf16=True, fp16=True, **forced):
    from ptlm.plan.setting import Forced
    from ptlm.run import preflight

    monkeypatch.setattr(preflight, "_accelerator_bf16", lambda: bf16)
    monkeypatch.setattr(preflight, "_accelerator_fp16", lambda: fp16)
    return preflight.plan_for("tiny", _tiny_config(), 64, 8, Forced(**forced), 2, on_gpu=False,
                             use_probe_cache=False)


def test_cpu_ranks_train_forced_bf16_and_default_to_fp32(monkeypatch):
    """DeepSpeed's CPU accelerator trains bf16: a forced --precision bf16 is planned on CPU
    ranks (it used to be refused: "cpu has no bf16"); fp32 stays the CPU default."""
    assert _cpu_plan(monkeypatch, precision="bf16", zero=1).setting.precision == "bf16"
    assert _cpu_plan(monkeypatch, precision="fp16", zero=1).setting.precision == "fp16"
    default = _cpu_plan(monkeypatch).setting
    assert (default.precision, default.zero, default.offload) == ("fp32", 0, "none")


def test_cpu_hardware_says_bf16_as_the_accelerator_does(monkeypatch):
    from deepspeed.accelerator import get_accelerator

    from ptlm.run import preflight

    if get_accelerator().device_name() != "cpu":
        pytest.skip("DeepSpeed's accelerator here is not the CPU one")
    assert preflight.hardware(2).bf16 == get_accelerator().is_bf16_supported()


def test_fp16_on_a_cpu_without_it_is_refused_clearly(monkeypatch):
    from ptlm.errors import PtlmError

    with pytest.raises(PtlmError, match="no fp16 on this CPU"):
        _cpu_plan(monkeypatch, fp16=False, precision="fp16")
    with pytest.raises(PtlmError, match="no bf16"):
        _cpu_plan(monkeypatch, bf16=False, precision="bf16")


def test_the_reference_is_the_documented_recipe(demo_dataset, init):
    """The reference sees the same blocks as ptlm's loader: the order is a pure function of
    (seed, epoch), global batch k takes blocks [k*G, (k+1)*G) of it."""
    from ptlm.data.reader import PackedDataset, PackedLoader

    ds = PackedDataset(demo_dataset, "train")
    loader = PackedLoader(ds, mx.GLOBAL_BATCH, global_batch=mx.GLOBAL_BATCH, seed=0)
    steps = loader.steps_per_epoch + 2  # across an epoch boundary
    ours = list(mx.global_batches(len(ds), mx.GLOBAL_BATCH, 0, steps))
    it = iter(loader)
    for k, idx in enumerate(ours):
        if k == loader.steps_per_epoch:
            loader.finish_epoch()
            it = iter(loader)
        assert (next(it).input_ids == ds.batch(idx)).all()


@pytest.mark.parametrize("setting", mx.PAIRWISE, ids=lambda s: s.name())
def test_matrix_pairwise(tmp_path, demo_dataset, init, setting):
    _check(mx.run_setting(setting, init, demo_dataset, tmp_path / "run"))


@pytest.mark.slow
@pytest.mark.parametrize("setting", [s for s in mx.full_product() if s not in mx.PAIRWISE],
                         ids=lambda s: s.name())
def test_matrix_full(tmp_path, demo_dataset, init, setting):
    _check(mx.run_setting(setting, init, demo_dataset, tmp_path / "run"))


def _alive(pid: int) -> bool:
    """Whether pid runs (a zombie nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


HOLD_PAST_TIMEOUT_S = 120  # each rank stays busy this long: well past the 8 s timeout


def test_a_setting_past_its_timeout_is_a_failed_row_and_leaves_no_process(tmp_path, demo_dataset,
                                                                          init):
    """bench_matrix runs hundreds of settings: one past its timeout must record a failed row, not
    raise TimeoutExpired and end the bench, and its kill must take what each rank started (a JIT
    op build's compilers; here a stand-in child, tests/cpu_fp16/sitecustomize.py)."""
    import time

    setting = mx.MatrixSetting("fp32", 0, "none", False, "adamw", True, 1)
    row = mx.run_setting(setting, init, demo_dataset, tmp_path / "row", timeout=3)
    assert row["error"].startswith("timed out") and row["timed_out"] is True
    assert not mx.passed(row)

    children = tmp_path / "children"
    children.mkdir()
    t0 = time.monotonic()
    launch = mx._launch(init, demo_dataset, tmp_path / "run", setting,
                        env={"PTLM_TEST_SPAWN_CHILD": str(children),
                             "PTLM_TEST_HOLD_S": str(HOLD_PAST_TIMEOUT_S)}, timeout=8)
    assert launch.timed_out and time.monotonic() - t0 < 60
    pids = [int(p.name) for p in children.iterdir()]
    assert len(pids) == mx.RANKS  # each rank had started its child before the kill
    deadline = time.monotonic() + 10
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, pids)), pids
