"""ptlm.plan.memory against the real DeepSpeed engine, every ZeRO stage, 2 CPU ranks.

bench/bench_zero_memory.py runs `deepspeed.initialize` + real steps on 2 gloo ranks
(DS_ACCELERATOR=cpu) and measures every live tensor byte with torch.profiler's allocator events
(no code or constants shared with the memory model; see its docstring). The default test measures
ZeRO-1/2/3 on a small OPT (~40 s); the offload points need DeepSpeed's CPU Adam (a JIT-built C++
op, minutes to build the first time) and are marked slow. Predictions are for device_type="cpu".
"""

from __future__ import annotations

import importlib.util
import subprocess
import warnings

import pytest

from ptlm.plan import memory
from ptlm.plan.facts import HardwareFacts, ModelFacts
from ptlm.plan.memory import Job, estimate
from ptlm.plan.setting import Setting
from tests.support import ROOT

TOLERANCE = 0.10
SMALL = dict(layers=2, hidden=256, vocab=8192, seq=128, micro_batch=2, precision="bf16",
             steps=3, chunked_loss=True)
DEFAULT_POINTS = ["z1", "z2", "z3"]
OFFLOAD_POINTS = ["z1-opt", "z2-opt", "z3-opt", "z3-param"]
MEASURE_TIMEOUT_S = 300  # the default grid takes 15-40 s here, ~2 min beside other work


def _bench():
    spec = importlib.util.spec_from_file_location("bench_zero_memory",
                                                  ROOT / "bench" / "bench_zero_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = _bench()


def _measure(points, timeout=MEASURE_TIMEOUT_S):
    """The grid's figures; a launch that hangs is killed at `timeout` and tried once more
    (with its ranks' stacks in a warning). What is tested is the figures, and a hung launch gives
    none. One hang was seen, in a loaded fresh-clone suite run; 12 launches in a loop beside two
    busy processes did not repeat it."""
    pytest.importorskip("deepspeed")
    try:
        return BENCH.run_grid(points, **SMALL, timeout=timeout)
    except subprocess.TimeoutExpired as hung:
        warnings.warn(f"bench_zero_memory hung for {timeout} s, tried again:\n"
                      f"{(hung.stderr or '')[-6000:]}")
        return BENCH.run_grid(points, **SMALL, timeout=timeout)


@pytest.fixture(scope="module")
def measured():
    return _measure(DEFAULT_POINTS)


def _check_peaks(results, points):
    rows = BENCH.rows(results)
    assert sorted({r["setting"] for r in rows}) == sorted(points)
    assert {r["rank"] for r in rows} == {0, 1}
    for row in rows:
        assert abs(row["error"]) <= TOLERANCE, (
            f"{row['setting']} rank {row['rank']}: predicted {row['predicted']:,} B, measured "
            f"{row['measured']:,} B ({100 * row['error']:+.1f}%)")


def _check_held(results):
    """What stays allocated between steps on the device besides the parameters (the optimizer's
    states and fp32 master, kept gradient buffers and buckets). Parameters are left out: the
    model's ZeRO-3 figure includes the layers gathered during forward/backward."""
    for r in results:
        offloaded = BENCH.OFFLOADED_LABELS if r["offload"] != "none" else ()
        held = sum(b for label, b in r["held_between_steps"].items()
                   if label not in offloaded and label != "parameters")
        p = r["predicted"]
        predicted = p["optimizer_states"]
        predicted += p["gradients"] if p["grads_persist"] else 0
        predicted += p["ds_buffers"] if p["ds_buffers_persist"] else 0
        predicted += p["offload_staging"]
        assert predicted == pytest.approx(held, rel=TOLERANCE), (r["setting"], r["rank"])


def test_peak_within_ten_percent_of_the_real_engine(measured):
    _check_peaks(measured, DEFAULT_POINTS)


def test_memory_held_between_steps_matches(measured):
    _check_held(measured)


# How far two steady steps' measured peaks may differ: a buffer whose free a gloo thread makes
# out of the profiler's sight reads as alive until its address is reused (the bench's doc).
# Seen at ZeRO-3 on this model: 84.4 vs 86.1 MB (2.0%) in one fresh-clone run of five.
STEADY_SPREAD = 0.05


# ------------------------------------------------------------------- frees the profiler misses

FREE_PROBE_ITERATIONS = 40
FREE_PROBE_NUMEL = 100_003  # an odd size: no other block of the probe has it


def _free_probe(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks: how many frees of FREE_PROBE_ITERATIONS tensors torch.profiler
    records, for tensors only the main thread touched and for tensors a gloo all-reduce used."""
    import json
    import os

    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    size = FREE_PROBE_NUMEL * 4
    seen = {}
    for mode in ("main_thread", "all_reduce", "gloo_drops_last"):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for _ in range(FREE_PROBE_ITERATIONS):
                t = torch.ones(FREE_PROBE_NUMEL)
                if mode == "all_reduce":  # as DeepSpeed's reductions: wait, then drop
                    dist.all_reduce(t)
                elif mode == "gloo_drops_last":  # the main thread lets go while gloo works
                    dist.all_reduce(t, async_op=True)
                t = None
            dist.barrier()  # every all-reduce done, every block released
        seen[mode] = sum(1 for e in prof.events()
                         if e.name == "[memory]" and e.cpu_memory_usage == -size)
    dist.barrier()
    dist.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)


@pytest.mark.slow  # a race by nature: which thread drops the last reference depends on the load
def test_the_profiler_misses_frees_made_on_gloo_threads(tmp_path):
    """The bench's premise, shown (not argued): torch.profiler records a free only on a thread it
    profiles. Every free of a tensor only the main thread touched is recorded; of tensors whose
    last reference gloo's worker threads drop, most are not (13-16 of 40 seen per rank here), and
    even after a waited all-reduce, as DeepSpeed's reductions do, some are not (0-9 of 40). A
    missed free keeps a block "alive" in the bench's curve until its address is reused: single
    runs read high, never low; hence each rank's lowest of N runs (bench_zero_memory --repeats)."""
    import json
    import time

    import torch

    from ptlm.run.machine.distributed import free_port

    ctx = torch.multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_free_probe, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.time() + 120
    for p in procs:
        p.join(max(1, deadline - time.time()))
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(s["main_thread"] == FREE_PROBE_ITERATIONS for s in seen), seen
    assert all(s[m] <= FREE_PROBE_ITERATIONS for s in seen for m in s), seen
    # frees gloo's threads make go unrecorded: 13-16 of 40 seen per rank on a quiet machine; under
    # load the main thread more often drops the last reference itself (34 and 18 seen in one
    # fresh-clone run), so the check is that some are missed, not how many
    assert any(s["gloo_drops_last"] < FREE_PROBE_ITERATIONS for s in seen), seen


def test_the_measured_step_is_steady(measured):
    """The last two steps peak alike (the first has no optimizer states yet at ZeRO-1..3)."""
    for r in measured:
        *_, before, last = r["step_peaks"]
        assert last == pytest.approx(before, rel=STEADY_SPREAD), (r["setting"], r["step_peaks"])


def test_the_measurement_can_fail(measured):
    """A model missing a real term (here: the Adam moments) is caught by the same check."""
    broken = []
    for r in measured:
        p = dict(r["predicted"])
        p["peak_tensor_bytes"] -= r["held_between_steps"]["optimizer_states"]
        broken.append({**r, "predicted": p})
    with pytest.raises(AssertionError):
        _check_peaks(broken, DEFAULT_POINTS)


@pytest.mark.slow
def test_offload_within_ten_percent_of_the_real_engine():
    results = _measure(OFFLOAD_POINTS, timeout=BENCH.GRID_TIMEOUT_S)
    _check_peaks(results, OFFLOAD_POINTS)
    _check_held(results)


# ------------------------------------------------------------------- the device knob, pure

def _small_opt() -> ModelFacts:
    from transformers import OPTConfig

    return ModelFacts.from_config(OPTConfig(hidden_size=256, num_hidden_layers=2, ffn_dim=1024,
                                            num_attention_heads=4, vocab_size=8192,
                                            word_embed_proj_dim=256, dropout=0.1))


def _hw(device_type: str) -> HardwareFacts:
    return HardwareFacts(gpu_name="x", gpu_memory_bytes=16 * 2**30, gpus_per_node=2,
                         device_type=device_type)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_cpu_dropout_masks_are_in_the_activation_dtype(precision):
    model, setting = _small_opt(), Setting(precision=precision, micro_batch=2)
    tokens = 2 * 128
    cpu = estimate(model, _hw("cpu"), Job(128), setting).activations
    cuda = estimate(model, _hw("cuda"), Job(128), setting).activations
    a = memory.PRECISION_BYTES[precision]
    assert cpu - cuda == model.layers * memory.DROPOUTS_PER_LAYER * (a - 1) * model.hidden * tokens


def test_cpu_chunked_loss_adds_an_fp32_head_sized_temporary_in_16_bit_only():
    model = _small_opt()
    for precision, extra in (("bf16", 4 * model.vocab * model.hidden), ("fp32", 0)):
        setting = Setting(precision=precision, micro_batch=2)
        cpu = estimate(model, _hw("cpu"), Job(128), setting).loss
        cuda = estimate(model, _hw("cuda"), Job(128), setting).loss
        assert cpu - cuda == extra


def test_plans_default_to_cuda_and_refuse_unknown_devices():
    assert HardwareFacts(gpu_name="x", gpu_memory_bytes=1, gpus_per_node=1).device_type == "cuda"
    with pytest.raises(Exception, match="device type"):
        _hw("tpu")


# Worst-rank device peaks measured on the real engine by bench/bench_zero_memory.py and RECORDED
# here (docs/benchmarks.md section 8, tables B, C and E; 2 CPU ranks, MiB; worst rank; C and E:
# each rank's lowest of 3 runs, since a free the profiler misses only raises a curve). The test
# below measures nothing: it pins the memory model to these recorded figures, so a change to the
# model that moves an offload prediction away from what was measured fails at once, in seconds.
# test_offload_table_e_measured_now (slow) measures table E's points again on the real engine.
RECORDED_OFFLOAD_PEAKS = [
    # (layers, hidden, vocab, seq, device GiB, setting, measured MiB)
    (4, 512, 50272, 64, 16, "z1-opt", 349.6),  # table B: one bucket holds every grad
    (4, 512, 50272, 64, 16, "z2-opt", 424.7),
    (4, 512, 50272, 64, 4, "z1-opt", 390.5),  # table C: the embedding is larger than a bucket
    (4, 512, 50272, 64, 4, "z2-opt", 405.4),
    (4, 512, 50272, 64, 4, "z3-opt", 277.0),
    # table E (not used to fit the model)
    (3, 384, 16384, 32, 1.6, "z1-opt", 107.2),
    (3, 384, 16384, 32, 1.6, "z2-opt", 115.7),
    (3, 384, 16384, 32, 1.6, "z3-opt", 80.3),
    (3, 384, 16384, 32, 1.6, "z3-param", 65.9),
]
TABLE_E = dict(layers=3, hidden=384, vocab=16384, seq=32, device_gib=1.6)
TABLE_E_REPEATS = 3  # each rank's lowest of 3 runs, as the table was measured


def _offload_args(layers, hidden, vocab, seq, gib):
    import argparse

    return argparse.Namespace(layers=layers, hidden=hidden, vocab=vocab, seq=seq, micro_batch=1,
                              precision="bf16", full_loss=True, device_gib=gib, steps=3)


@pytest.mark.parametrize("layers, hidden, vocab, seq, gib, name, measured", RECORDED_OFFLOAD_PEAKS)
def test_offload_predictions_match_the_recorded_measurements(layers, hidden, vocab, seq, gib,
                                                             name, measured):
    """ZeRO-1/2 + optimizer offload peak where DeepSpeed takes each grad slice's norm in fp64
    (set_norm_for_param_grad_in_gpu); the model missed it and was 12-26% low before. Compared
    with measurements recorded above, not taken now (see RECORDED_OFFLOAD_PEAKS)."""
    zero, offload = BENCH.SETTINGS[name]
    args = _offload_args(layers, hidden, vocab, seq, gib)
    predicted = BENCH._plan(args, zero, offload).memory.peak_tensor_bytes / 2**20
    assert predicted == pytest.approx(measured, rel=TOLERANCE)


@pytest.mark.slow
def test_offload_table_e_measured_now():
    """Table E's offload points on the real engine now (2 CPU ranks, DeepSpeed's CPU Adam), each
    rank's lowest of TABLE_E_REPEATS runs, within TOLERANCE of the memory model; every run's
    figure is kept in the failure message (the spread of single runs)."""
    pytest.importorskip("deepspeed")
    points = [name for (*shape, name, _) in RECORDED_OFFLOAD_PEAKS if shape[:4] == [
        TABLE_E["layers"], TABLE_E["hidden"], TABLE_E["vocab"], TABLE_E["seq"]]]
    runs = [BENCH.run_grid(points, micro_batch=1, precision="bf16", steps=3, chunked_loss=False,
                           **TABLE_E) for _ in range(TABLE_E_REPEATS)]
    rows = BENCH.rows(BENCH.lowest_of(runs))
    assert sorted({r["setting"] for r in rows}) == sorted(points)
    for row in rows:
        assert abs(row["error"]) <= TOLERANCE, row


def test_repeats_keep_each_ranks_lowest_peak():
    """--repeats: a free the profiler misses only raises a curve, so each (setting, rank) keeps
    its lowest run, and every run's figure stays visible."""
    def result(setting, rank, peak):
        return {"setting": setting, "rank": rank, "offload": "optimizer",
                "device_peak_bytes": peak, "peak_bytes": peak + 100}

    runs = [[result("z2-opt", 0, 139), result("z2-opt", 1, 104)],
            [result("z2-opt", 0, 115), result("z2-opt", 1, 110)],
            [result("z2-opt", 0, 127), result("z2-opt", 1, 104)]]
    best = {r["rank"]: r for r in BENCH.lowest_of(runs)}
    assert best[0]["device_peak_bytes"] == 115 and best[0]["measured_runs"] == [139, 115, 127]
    assert best[1]["device_peak_bytes"] == 104 and best[1]["measured_runs"] == [104, 110, 104]
