"""`ptlm probe` (also `deepspeed launch/probe.py`): confirm a plan with real steps on this device
and cache the largest micro-batch that fits."""

from __future__ import annotations

import argparse
import json
import time

from ptlm.errors import PtlmError
from ptlm.plan.probe_cache import cache_key, divisors, largest_fitting, write_cache
from ptlm.run.probe import Trials, format_result


def add_arguments(p) -> None:
    from ptlm.commands.flags import add_setting_arguments

    p.add_argument("--model", required=True, help="hub name, HF folder, or a ptlm alias")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--from-scratch", action="store_true",
                   help="random weights from the config (memory is the same)")
    p.add_argument("--simulate-gpu-memory", help="CPU rehearsal: treat a trial whose predicted "
                                                 "peak exceeds this (e.g. 16GiB) as out of memory")
    p.add_argument("--json", action="store_true")
    add_setting_arguments(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # added by the deepspeed launcher


def run(args) -> int:
    import deepspeed

    from ptlm.commands.flags import setting_overrides
    from ptlm.model.config import resolve_config
    from ptlm.model.load import load_model
    from ptlm.model.loss import LossModule
    from ptlm.run import setup as runsetup
    from ptlm.run.distributed import init
    from ptlm.units import parse_size

    dist = init()
    gpu = runsetup.on_gpu()
    forced = setting_overrides(args)
    config = resolve_config(args.model)
    p = runsetup.plan_for(args.model, config, args.seq_len, args.global_batch, forced,
                          dist.world_size, gpu, use_probe_cache=False)
    model = load_model(config if args.from_scratch else args.model, precision=p.setting.precision)
    if p.setting.checkpointing:
        from ptlm.model.load import enable_checkpointing

        enable_checkpointing(model)
    from ptlm.model.optim import build_optimizer
    from ptlm.plan.dsconfig import build_ds_config

    ds = build_ds_config(p)
    params = ds.pop("optimizer", {}).get("params", {})
    ds["zero_allow_untested_optimizer"] = True
    optimizer = build_optimizer(p.setting, model.named_parameters(), lr=params.get("lr", 1e-5))
    if optimizer is None:
        ds["optimizer"] = {"type": "AdamW", "params": params}
    engine, *_ = deepspeed.initialize(model=LossModule(model, p.setting.chunked_loss),
                                      optimizer=optimizer, config=ds)
    simulate = parse_size(args.simulate_gpu_memory) if args.simulate_gpu_memory else None
    trials = Trials(engine, dist, p, args.seq_len, model.config.vocab_size, simulate)
    t0 = time.perf_counter()
    per_gpu = p.global_batch // dist.world_size
    largest = largest_fitting(trials, divisors(per_gpu), p.micro_batch)
    hw = p.hardware
    key = cache_key(args.model, hw.gpu_name, hw.gpu_memory_bytes, args.seq_len, p.setting,
                    dist.world_size)
    result = {"largest_micro_batch": largest, "planned_micro_batch": p.micro_batch,
              "trials": {str(k): v for k, v in sorted(trials.results.items())},
              "device": hw.gpu_name, "simulated_gpu_memory": simulate,
              "seconds": time.perf_counter() - t0, "time": time.time()}
    if dist.is_main:
        write_cache(key, result)
        print(json.dumps(result, indent=2) if args.json else format_result(p, result))
    if largest == 0:
        raise PtlmError(f"even micro-batch 1 ran out of memory with {p.setting.describe()}: "
                        "plan again with --checkpointing on, --zero 3 or --offload optimizer")
    return 0


