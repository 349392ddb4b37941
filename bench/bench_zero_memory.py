"""The real DeepSpeed engine's memory per ZeRO stage and offload, measured, vs ptlm.plan.memory.

    .venv/bin/python bench/bench_zero_memory.py                    # default grid, prints a table
    .venv/bin/python bench/bench_zero_memory.py --settings z0 z3-param --layers 2 --hidden 256

The driver launches `torchrun --nproc_per_node 2` on this same file (DS_ACCELERATOR=cpu, gloo);
each rank builds an OPT model from a config, hands it to `deepspeed.initialize` exactly as ptlm's
trainer does (ptlm's client optimizer, ptlm's DeepSpeed config from a forced plan, LossModule),
and runs `--steps` training steps (engine forward, engine.backward, engine.step).

How it measures (no code or constants shared with the memory model):
  torch.profiler with profile_memory=True records every allocation and free of torch's CPU
  allocator (c10 ProfiledCPUMemoryReporter) with its address and size. The profiler runs from
  before the model is built to after the last step, so the running sum of those events is the
  bytes of live tensor storage the run created: the model, DeepSpeed's flat 16-bit groups, fp32
  partitions, gradient buckets and partitions, optimizer states, activations, loss temporaries.
  The peak of that curve inside the last step is the step's peak (earlier steps show it is
  steady): storage bytes the allocator handed out, not numel x itemsize of views.
  The profiler sees frees only on the threads it profiles; gloo's worker threads sometimes drop
  a collective's buffer last. Two corrections (counted in the result as missed_frees and
  late_frees): an address handed out again was free by then, and at each step boundary a block
  that no Python object reaches is gone. A free still missed leaves the curve too high until the
  address is reused: at ZeRO-3 and with offload the worst rank varies by up to ~50 MiB between
  runs of the default model. Python's cyclic garbage is collected before each step (gc.collect),
  so reference cycles do not make the peak wander.
  Shared with ptlm on purpose: the DeepSpeed config (ptlm.plan.dsconfig.engine_config of a
  plan with every knob forced, so bucket sizes are the ones ptlm writes), the model loader, the
  optimizer builder and LossModule -- what ptlm runs is what is measured.
Attribution: at the start of the last step the script walks the engine (module parameters and
  their ZeRO-3 partitions, the client optimizer's state, DeepSpeed's optimizer wrapper's
  attributes) and labels each live block by who holds it; blocks allocated during the step are
  labelled by the phase that allocated them (forward = activations + loss temporaries,
  backward, optimizer step).
"Device" on a CPU: every byte is host memory here. The planner splits a GPU's bytes from the
  host's; offloaded blocks are the ones DeepSpeed puts on its offload device ('cpu') by design:
  the fp32 master partitions and their grads, the optimizer states, ZeRO-3's grad partition buffer
  with optimizer offload, the 16-bit parameter partitions with parameter offload, and ZeRO-1/2's
  host staging buffers. `device peak` = the peak of (live bytes - live offloaded bytes), compared
  with the planner's GPU-side peak_tensor_bytes; `all` = every live byte.
The prediction is made for device_type="cpu" (on CPU torch stores dropout masks in the input
dtype, on CUDA as bool; the chunked loss makes one more fp32 temporary): these are CPU figures.
Results and their reading: docs/benchmarks.md section 8; tests/test_memory_zero.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import run_bounded  # noqa: E402

MiB = 2**20
SETTINGS = {  # name -> (zero stage, offload)
    "z0": (0, "none"), "z1": (1, "none"), "z2": (2, "none"), "z3": (3, "none"),
    "z1-opt": (1, "optimizer"), "z2-opt": (2, "optimizer"), "z3-opt": (3, "optimizer"),
    "z3-param": (3, "parameters"),
}
DEFAULT_SETTINGS = list(SETTINGS)
# Per-rank memory the plan assumes (it sizes DeepSpeed's buckets from it): a 16 GiB device.
DEVICE_MEMORY_BYTES = 16 * 2**30
LR = 1e-4
PHASES = ("forward", "backward", "step")
# Labels of blocks that live on the offload device by DeepSpeed's design (see module doc).
OFFLOADED_LABELS = ("optimizer_states", "master_fp32", "fp32_grads", "host_buffers")
# One launch of the grid: the default test's 3 settings take 15-40 s here, the offload grid a few
# minutes once DeepSpeed's CPU Adam is built (building it first takes minutes more).
GRID_TIMEOUT_S = 1800


# ---------------------------------------------------------------------------------------- driver

def run_grid(settings: list[str], *, layers: int, hidden: int, vocab: int, seq: int,
             micro_batch: int, precision: str, steps: int, chunked_loss: bool,
             device_gib: float = DEVICE_MEMORY_BYTES / 2**30,
             timeout: float = GRID_TIMEOUT_S) -> list[dict]:
    """Launch 2 ranks on this file and return one result per (setting, rank). A launch that
    overruns `timeout` is killed with its ranks (subprocess.TimeoutExpired)."""
    from ptlm.run.machine.distributed import free_port  # imports torch: the driver needs none

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                   PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), __file__, "--worker", "--out", str(out),
               "--layers", str(layers), "--hidden", str(hidden), "--vocab", str(vocab),
               "--seq", str(seq), "--micro-batch", str(micro_batch), "--precision", precision,
               "--steps", str(steps), "--device-gib", str(device_gib), "--settings", *settings]
        if not chunked_loss:
            cmd.append("--full-loss")
        proc = run_bounded(cmd, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"ranks failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                               f"{proc.stderr[-6000:]}")
        results = []
        for rank in range(2):
            results += json.loads(out.with_suffix(f".{rank}.json").read_text())
        return results


def lowest_of(runs: list[list[dict]]) -> list[dict]:
    """Per (setting, rank), the repeat with the lowest measured peak, with every repeat's figure
    in `measured_runs`. A free the profiler did not see (a gloo thread dropped the block) can only
    raise a curve, never lower it, and the program allocates the same way each time: so the
    lowest repeat is the closest to the truth, and the spread shows how often frees were missed."""
    best: dict[tuple, dict] = {}
    seen: dict[tuple, list[int]] = {}
    for results in runs:
        for r in results:
            key = (r["setting"], r["rank"])
            seen.setdefault(key, []).append(_measured(r))
            if key not in best or _measured(r) < _measured(best[key]):
                best[key] = r
    return [{**r, "measured_runs": seen[key]} for key, r in best.items()]


# ---------------------------------------------------------------------------------------- worker

def worker(args) -> None:
    import deepspeed
    import deepspeed.comm.torch as ds_comm_torch
    import torch

    # DeepSpeed's CPU shared-memory all-reduce op serves inference_all_reduce only
    # (deepspeed/comm/torch.py:292-306); loading it costs ~20 s per rank here, so skip it.
    ds_comm_torch.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    results = []
    for name in args.settings:
        gc.collect()
        results.append(measure_setting(name, args, rank))
        gc.collect()
        torch.distributed.barrier()
    Path(args.out).with_suffix(f".{rank}.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()  # leave together: no rank exits mid-collective


def _model_config(args):
    from transformers import OPTConfig

    # OPT as published (dropout 0.1 on both residual branches, no attention dropout), small.
    return OPTConfig(hidden_size=args.hidden, num_hidden_layers=args.layers,
                     num_attention_heads=max(1, args.hidden // 64), ffn_dim=4 * args.hidden,
                     vocab_size=args.vocab, max_position_embeddings=max(2048, args.seq),
                     word_embed_proj_dim=args.hidden, do_layer_norm_before=True, dropout=0.1)


def _plan(args, zero: int, offload: str):
    """ptlm's plan with everything forced, for this 2-rank 'device' (and its DeepSpeed config)."""
    from ptlm.plan.facts import HardwareFacts, ModelFacts
    from ptlm.plan.memory import Job
    from ptlm.plan.planner import plan

    hw = HardwareFacts(gpu_name="cpu", gpu_memory_bytes=int(args.device_gib * 2**30),
                       gpus_per_node=2, bf16=True, device_type="cpu")
    forced = dict(precision=args.precision, zero=zero, offload=offload, checkpointing=False,
                  optimizer="adamw", chunked_loss=not args.full_loss, micro_batch=args.micro_batch)
    job = Job(seq_len=args.seq, global_batch=2 * args.micro_batch)
    return plan(ModelFacts.from_config(_model_config(args), name="opt-bench"), hw, job, forced)


def measure_setting(name: str, args, rank: int) -> dict:
    import deepspeed
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from ptlm.model.load import load_model
    from ptlm.model.forward import LossModule
    from ptlm.model.optim import build_optimizer
    from ptlm.plan.dsconfig import engine_config

    zero, offload = SETTINGS[name]
    p = _plan(args, zero, offload)
    ds_config = engine_config(p)  # ptlm's engine's config (its "optimizer" unused: a client one)
    config = _model_config(args)
    torch.manual_seed(0)
    ids = [torch.randint(0, args.vocab, (args.micro_batch, args.seq)) for _ in range(args.steps)]
    marks = {}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        zero3 = None
        if zero == 3:  # as ptlm's build_model: transformers builds it partitioned (zero.Init)
            from transformers.integrations import HfDeepSpeedConfig
            zero3 = HfDeepSpeedConfig(ds_config)  # noqa: F841
        model = load_model(config, precision=args.precision, attn="sdpa")
        optimizer = build_optimizer(p.setting, model.named_parameters(), lr=LR)
        engine, *_ = deepspeed.initialize(model=LossModule(model, not args.full_loss),
                                          optimizer=optimizer, config=ds_config)
        engine.train()
        labels, alive = None, []
        for i in range(args.steps):
            gc.collect()  # see the module doc: reference cycles would make the peak wander
            with record_function(f"bench::{i}::boundary"):
                alive.append(_alive_storages(engine, optimizer, zero, offload))
            if i == args.steps - 1:
                labels = _label_blocks(engine, optimizer, zero, offload)
            with record_function(f"bench::{i}::forward"):
                loss, _, _ = engine(ids[i])
            with record_function(f"bench::{i}::backward"):
                engine.backward(loss)
                del loss
            with record_function(f"bench::{i}::step"):
                engine.step()
        final_type = type(engine.optimizer).__name__
        del engine, optimizer, model, zero3
        gc.collect()
    events, marks = _events(prof)
    result = _analyse(events, marks, labels, args.steps, alive)
    mem = p.memory
    result.update(setting=name, zero=zero, offload=offload, rank=rank,
                  optimizer=final_type, predicted=mem.to_dict(), plan_setting=p.setting.to_dict(),
                  model=dict(layers=args.layers, hidden=args.hidden, vocab=args.vocab,
                             seq=args.seq, micro_batch=args.micro_batch,
                             precision=args.precision, parameters=p.model.parameters,
                             loss="HF full-logits" if args.full_loss else "chunked",
                             bucket=p.ds_buffers.reduce_bucket_size))
    return result


def _label_blocks(engine, client_optimizer, zero: int, offload: str) -> dict:
    """{storage address: (label, bytes)} for the blocks the engine holds between steps."""
    import torch

    labels: dict[int, tuple[str, int]] = {}

    def add(t, label):
        if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.untyped_storage().nbytes():
            s = t.untyped_storage()
            labels.setdefault(s.data_ptr(), (label, s.nbytes()))

    ds_opt = engine.optimizer
    host_grad_partitions = zero == 3 and offload != "none"
    for p in engine.module.parameters():
        add(p.data, "parameters")
        if hasattr(p, "ds_tensor"):  # ZeRO-3's own partition of this parameter
            add(p.ds_tensor, "host_buffers" if offload == "parameters" else "parameters")
        add(p.grad, "gradients")
    inner = getattr(ds_opt, "optimizer", client_optimizer)
    for opt in {id(o): o for o in (client_optimizer, inner) if o is not None}.values():
        for state in opt.state.values():
            for v in state.values():
                add(v, "optimizer_states")
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat",
                 "fp32_groups_flat_partition", "fp32_groups", "fp32_groups_flat"):
        for t in _tensors(getattr(ds_opt, attr, None)):
            add(t, "master_fp32")
            add(t.grad, "fp32_grads")
    for attr, value in vars(ds_opt).items():
        for t in _tensors(value):
            host_grads = host_grad_partitions and attr == "grad_partitions_flat_buffer"
            if "cpu" in attr.lower() or host_grads:
                add(t, "host_buffers")
            elif "grad" in attr.lower() or "ipg" in attr.lower():
                add(t, "gradients")
            else:
                add(t, "ds_other")
    # stage 3 keeps its gradient buckets in ipg_buckets[dtype].buffer
    for bucket in getattr(ds_opt, "ipg_buckets", {}).values():
        add(getattr(bucket, "buffer", None), "gradients")
    return labels


def _alive_storages(engine, client_optimizer, zero: int, offload: str) -> set:
    """Addresses of every tensor storage Python can reach now (between steps no autograd graph
    holds tensors): all tensor objects the garbage collector tracks, their grads, and what the
    engine holds (see _label_blocks)."""
    import torch

    ptrs = set(_label_blocks(engine, client_optimizer, zero, offload))
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            for t in (obj, obj.grad if obj.is_leaf else None, getattr(obj, "ds_tensor", None)):
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    ptrs.add(t.untyped_storage().data_ptr())
    return ptrs


def _tensors(value, depth: int = 0):
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 3 and isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v, depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v, depth + 1)


def _events(prof):
    """(allocation events [(t, ptr, bytes)] in time order, {(step, phase): (start, end)})."""
    from torch._C._profiler import _EventType

    allocs, marks, stack = [], {}, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation:
            f = e.extra_fields
            if f.device.type == "cpu":
                op = e.parent.name if e.parent is not None else "-"
                allocs.append((e.start_time_ns, f.ptr, f.alloc_size, op))
        elif e.name.startswith("bench::"):
            _, step, phase = e.name.split("::")
            marks[(int(step), phase)] = (e.start_time_ns, e.end_time_ns)
    allocs.sort(key=lambda a: a[0])
    return allocs, marks


def _analyse(allocs, marks, labels: dict, steps: int, alive: list) -> dict:
    """Sweep the allocation events: per-step peaks, and the last step's peak with its labels.

    The profiler sees the frees of the threads it profiles only: a tensor whose last reference
    gloo's worker thread drops (a collective's buffer) is freed unseen. Two corrections: an
    address handed out again was free by then (the allocator never hands out a live block), and
    at each step boundary a block no Python object reaches (`alive`) is gone.
    """
    last = steps - 1
    boundaries = {marks[(i, "boundary")][0]: i for i in range(steps)}
    allocs = sorted(allocs + [(t, None, 0, "boundary") for t in boundaries], key=lambda a: a[0])
    late_frees = [0] * steps
    last_start = marks[(last, "forward")][0]
    live: dict[int, tuple[int, str]] = {}  # ptr -> (bytes, label)
    ops: dict[int, str] = {}  # ptr -> the op that allocated it
    total = offloaded = 0
    step_peaks = [0] * steps
    peak = dev_peak = 0
    peak_snap = dev_snap = None
    phase_windows = [(k, v) for k, v in marks.items()]

    def phase_of(t):
        for (step, phase), (a, b) in phase_windows:
            if a <= t <= b:
                return step, phase
        return None, "outside"

    labelled = False
    missed_frees = []
    for t, ptr, size, op in allocs:
        if ptr is None:  # a step boundary: drop the blocks nothing holds any more
            i = boundaries[t]
            for q in [q for q in live if q not in alive[i]]:
                b, lab = live.pop(q)
                total -= b
                late_frees[i] += b
            continue
        if not labelled and t >= last_start:
            # the blocks alive as the last step starts: label them by holder
            live = {q: (b, labels.get(q, ("unlabelled", b))[0]) for q, (b, _) in live.items()}
            offloaded = sum(b for b, lab in live.values() if lab in OFFLOADED_LABELS)
            labelled = True
        step, phase = phase_of(t)
        if size > 0:
            if ptr in live:  # the allocator reuses only free addresses: a free we did not see
                missed_frees.append((live[ptr][0], ops.get(ptr), live[ptr][1], phase))
                b, lab = live.pop(ptr)
                total -= b
                if lab in OFFLOADED_LABELS:
                    offloaded -= b
            live[ptr] = (size, f"new:{phase}")
            ops[ptr] = op
            total += size
        else:
            b, lab = live.pop(ptr, (0, ""))
            total -= b
            if lab in OFFLOADED_LABELS:
                offloaded -= b
        if step is not None:
            step_peaks[step] = max(step_peaks[step], total)
        if step == last:
            if total > peak:
                peak, peak_snap = total, (phase, _by_label(live))
                peak_blocks = _largest(live, ops)
            if total - offloaded > dev_peak:
                dev_peak, dev_snap = total - offloaded, (phase, _by_label(live))
    between = {lab: b for lab, b in _by_label_start(labels).items()}
    return dict(peak_bytes=peak, peak_phase=peak_snap[0], peak_labels=peak_snap[1],
                device_peak_bytes=dev_peak, device_peak_phase=dev_snap[0],
                device_peak_labels=dev_snap[1], step_peaks=step_peaks, held_between_steps=between,
                peak_blocks=peak_blocks, missed_frees=missed_frees, late_frees=late_frees)


def _largest(live, ops, n: int = 25) -> list:
    """The n largest live blocks: (bytes, label, allocating op) -- for reading a peak."""
    blocks = sorted(((b, lab, ops.get(q, "?")) for q, (b, lab) in live.items()), reverse=True)
    return blocks[:n]


def _by_label(live) -> dict:
    out: dict[str, int] = {}
    for b, lab in live.values():
        out[lab] = out.get(lab, 0) + b
    return out


def _by_label_start(labels) -> dict:
    out: dict[str, int] = {}
    for lab, b in labels.values():
        out[lab] = out.get(lab, 0) + b
    return out


# ---------------------------------------------------------------------------------------- table

def _measured(r: dict) -> int:
    return r["device_peak_bytes"] if r["offload"] != "none" else r["peak_bytes"]


def rows(results: list[dict]) -> list[dict]:
    """One row per (setting, rank): measured vs predicted device peak and the categories.

    `error` compares the prediction with the worst rank of the setting (ranks differ a little:
    which rank's partition holds what); a plan must fit the worst rank. `rank_error` is this
    rank's own."""
    worst: dict[str, int] = {}
    for r in results:
        worst[r["setting"]] = max(worst.get(r["setting"], 0), _measured(r))
    out = []
    for r in results:
        pred = r["predicted"]
        offloaded = r["offload"] != "none"
        measured = _measured(r)
        labels = r["device_peak_labels"] if offloaded else r["peak_labels"]
        out.append(dict(
            setting=r["setting"], rank=r["rank"], optimizer=r["optimizer"], measured=measured,
            predicted=pred["peak_tensor_bytes"], worst=worst[r["setting"]],
            error=pred["peak_tensor_bytes"] / worst[r["setting"]] - 1,
            rank_error=pred["peak_tensor_bytes"] / measured - 1,
            phase=(r["device_peak_phase"] if offloaded else r["peak_phase"]),
            predicted_phase=pred["peak_phase"], all_bytes=r["peak_bytes"], labels=labels,
            step_peaks=r["step_peaks"], runs=r.get("measured_runs", [measured])))
    return out


def markdown(results: list[dict]) -> str:
    first = results[0]["model"]
    head = (f"OPT {first['layers']} layers, hidden {first['hidden']}, vocab {first['vocab']} "
            f"({first['parameters'] / 1e6:.1f} M params), {first['precision']}, micro-batch "
            f"{first['micro_batch']} x {first['seq']} tokens, {first['loss']} loss, reduce bucket "
            f"{first['bucket'] / 1e6:.1f} M elements, 2 ranks (gloo, DS_ACCELERATOR=cpu); MiB; "
            "predictions for device_type='cpu'\n\n")
    lines = ["| setting | rank | measured device peak | predicted | error vs worst rank (this "
             "rank) | measured phase (predicted) | all live bytes | at the measured peak: held "
             "before the step / made in forward / backward / step |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows(results):
        lab = row["labels"]
        held = {k: v for k, v in lab.items() if not k.startswith("new:")}
        runs = sorted(row["runs"])
        spread = (f" (runs: {', '.join(f'{m / MiB:.1f}' for m in runs)})" if len(runs) > 1
                  and runs[-1] - runs[0] >= MiB // 10 else "")
        held_txt = ", ".join(f"{k} {v / MiB:.1f}" for k, v in sorted(held.items()) if v > MiB // 10)
        made = " / ".join(f"{lab.get('new:' + ph, 0) / MiB:.1f}" for ph in PHASES)
        lines.append(
            f"| {row['setting']} | {row['rank']} | {row['measured'] / MiB:.1f}{spread} | "
            f"{row['predicted'] / MiB:.1f} | {100 * row['error']:+.1f}% "
            f"({100 * row['rank_error']:+.1f}%) | {row['phase']} "
            f"({row['predicted_phase']}) | {row['all_bytes'] / MiB:.1f} | {held_txt} / {made} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=list(SETTINGS))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=50272)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device-gib", type=float, default=DEVICE_MEMORY_BYTES / 2**30,
                    help="per-rank memory the plan assumes; it sizes DeepSpeed's buckets (1%%)")
    ap.add_argument("--full-loss", action="store_true", help="HF's loss instead of the chunked one")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run the grid this many times and report each rank's lowest peak "
                         "(a free the profiler missed only ever raises a curve)")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    t0 = time.time()
    results = lowest_of([
        run_grid(args.settings, layers=args.layers, hidden=args.hidden, vocab=args.vocab,
                 seq=args.seq, micro_batch=args.micro_batch, precision=args.precision,
                 steps=args.steps, chunked_loss=not args.full_loss, device_gib=args.device_gib)
        for _ in range(args.repeats)])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(markdown(results))
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
