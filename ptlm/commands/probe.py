"""`ptlm probe` (also `deepspeed launch/probe.py`): confirm a plan with real steps on this device
and cache the largest micro-batch that fits."""

from __future__ import annotations

import argparse
import json
import logging
import time

from ptlm.commands.flags import (
    add_dataclass_arguments,
    add_setting_arguments,
    dataclass_values,
    forced_from_args,
)
from ptlm.data.documents import DEFAULT_PACKING, PACKINGS
from ptlm.data.reader import PackedDataset
from ptlm.errors import PtlmError
from ptlm.model.config import text_config
from ptlm.plan.dsconfig import engine_config
from ptlm.plan.planner import with_micro_batch
from ptlm.plan.probe_cache import cache_key, divisors, largest_fitting, write_cache
from ptlm.run import preflight
from ptlm.run.config import Optimization
from ptlm.run.engine import build_engine
from ptlm.run.machine.distributed import init, shutdown
from ptlm.run.tools.probe import Trials, format_result, probe_batches
from ptlm.units import parse_size

log = logging.getLogger(__name__)


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="hub name, HF folder, or a ptlm alias")
    p.add_argument("--data", help="folder written by `ptlm prepare`: the model is built as "
                                  "`ptlm train --data` builds it (vocabulary sized/checked against "
                                  "the data's tokenizer; seq_len from the data)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the --data's)")
    p.add_argument("--from-scratch", action="store_true",
                   help="random weights from the config (memory is the same)")
    p.add_argument("--ds-config", help="the DeepSpeed template the run will use (ds_configs/*.json)")
    p.add_argument("--simulate-gpu-memory", help="CPU rehearsal: treat a trial whose predicted "
                                                 "peak exceeds this (e.g. 16GiB) as out of memory")
    p.add_argument("--packing", choices=PACKINGS, default=DEFAULT_PACKING,
                   help="as `ptlm train --packing`: documents (default) adds the block-causal "
                        "structure the run's step carries")
    p.add_argument("--json", action="store_true")
    add_setting_arguments(p)
    add_dataclass_arguments(p, Optimization, "optimization (as `ptlm train`'s; they go into the "
                                             "DeepSpeed config the probe's engines are built with)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # added by the deepspeed launcher


def run(args) -> int:
    clean = False
    try:
        code = _run(args)
        clean = True
        return code
    finally:
        shutdown(clean)


def source_and_seq_len(args):
    """(the model as training builds it (ptlm.run.preflight.model_source), the sequence length, the
    --data's training split or None)."""
    data = None
    if args.data:
        data = PackedDataset(args.data, "train", packing=args.packing)
        if args.seq_len is not None and args.seq_len != data.seq_len:
            raise PtlmError(f"--seq-len {args.seq_len}, but {args.data} holds blocks of "
                            f"{data.seq_len} tokens; drop --seq-len or prepare the data again")
    elif args.seq_len is None:
        raise PtlmError("give --seq-len, or --data (the prepared data the run will train on)")
    source = preflight.model_source(args.model, args.from_scratch, data)
    if data is None and args.from_scratch:
        log.warning("--from-scratch without --data: the embedding table is the config's own "
                    "(%s rows); `ptlm train` sizes it to the data's tokenizer, give --data to "
                    "probe the same model", getattr(source.config, "vocab_size", "?"))
    return source, (data.seq_len if data is not None else args.seq_len), data


def optimization(args) -> Optimization:
    """The optimizer flags, checked as `ptlm train` checks them."""
    return Optimization(**dataclass_values(args, Optimization))


def probe_plan(args, source, seq_len: int, world_size: int, gpu: bool):
    """Rank 0's plan for the probe, shared with every rank (as training's resolve_plan)."""
    forced = forced_from_args(args)
    global_batch = optimization(args).global_batch or preflight.DEFAULT_GLOBAL_BATCH
    return preflight.rank0_plan(lambda: preflight.plan_for(
        args.model, source.config, seq_len, global_batch, forced, world_size, gpu,
        use_probe_cache=False, documents=args.packing == "documents"))


def _run(args) -> int:
    dist = init()
    gpu = preflight.on_gpu()
    source, seq_len, data = source_and_seq_len(args)
    p = probe_plan(args, source, seq_len, dist.world_size, gpu)
    hyper = preflight.optimizer_hyper(optimization(args))

    def build(plan):  # the builder training uses, for each trial's micro-batch
        return build_engine(plan, source, hyper, args.ds_config, packing=args.packing)

    args.seq_len = seq_len
    simulate = parse_size(args.simulate_gpu_memory) if args.simulate_gpu_memory else None
    vocab = source.vocab or text_config(source.config).vocab_size  # ids the data may hold
    trials = Trials(build, dist, p, probe_batches(args.packing, data, seq_len, vocab,
                                                  dist.device), simulate)
    t0 = time.perf_counter()
    per_gpu = p.global_batch // dist.world_size
    largest = largest_fitting(trials, divisors(per_gpu), p.micro_batch)
    hw = p.hardware
    key = cache_key(args.model, hw.gpu_name, hw.gpu_memory_bytes, args.seq_len, p.setting,
                    dist.world_size, p.job.documents)
    # the engine a run of this plan builds: at the planned micro-batch, or at the probe's largest
    # when that is smaller (plan_for lowers it so); the model, optimizer and packing path are
    # the ones the trials ran
    run_plan = with_micro_batch(p, largest) if 0 < largest < p.micro_batch else p
    engine = {**(trials.record or {}), "ds_config": engine_config(run_plan, hyper, args.ds_config),
              "setting": run_plan.setting.to_dict()}
    result = {"largest_micro_batch": largest, "planned_micro_batch": p.micro_batch,
              "trials": {str(k): v for k, v in sorted(trials.results.items())},
              "device": hw.gpu_name, "simulated_gpu_memory": simulate,
              "seconds": time.perf_counter() - t0, "time": time.time(), "engine": engine}
    if dist.is_main:
        write_cache(key, result)
        print(json.dumps(result, indent=2) if args.json else format_result(p, result))
    if largest == 0:
        raise PtlmError(f"even micro-batch 1 ran out of memory with {p.setting.describe()}: "
                        "plan again with --checkpointing on, --zero 3 or --offload optimizer")
    return 0


