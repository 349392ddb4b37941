"""`ptlm probe` (also `deepspeed launch/probe.py`): confirm a plan on the real device.

Runs real training steps of the planned setting on random tokens, searching the largest
micro-batch that fits: an out-of-memory error is caught, memory freed, and a smaller micro-batch
tried (every rank agrees on each outcome, so ranks never diverge). Measured
`torch.cuda.max_memory_allocated` / `max_memory_reserved` are printed beside the prediction and the
result is cached; `launch/train.py --plan auto` then never plans a micro-batch above what the probe
saw fit on this GPU.

Without a GPU the search still runs real DeepSpeed steps (CPU ranks), and `--simulate-gpu-memory`
stands in for the one thing a CPU cannot have, a GPU's memory size: a trial whose predicted peak
exceeds it raises the same OutOfMemoryError a GPU would.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import torch

from ptlm.errors import PtlmError

log = logging.getLogger("ptlm.probe")

PROBE_STEPS = 2  # optimizer steps per trial: the 2nd has optimizer states (steady state)
CACHE_ENV = "PTLM_CACHE"


# ------------------------------------------------------------------------------ pure search

def largest_fitting(fits: Callable[[int], bool], options: list[int], start: int) -> int:
    """The largest option (ascending list) for which fits() holds, 0 if none; assumes memory
    grows with the micro-batch. Starts at the planned `start`, walks up while it fits, down
    while it does not, so a correct plan costs two trials."""
    options = sorted(options)
    i = options.index(start) if start in options else len(options) - 1
    if fits(options[i]):
        while i + 1 < len(options) and fits(options[i + 1]):
            i += 1
        return options[i]
    while i > 0:
        i -= 1
        if fits(options[i]):
            return options[i]
    return 0


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ------------------------------------------------------------------------------ cache

def cache_path() -> Path:
    root = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "ptlm"))
    return root / "probe.json"


def cache_key(model: str, gpu_name: str, gpu_memory: int, seq_len: int, setting, world: int) -> str:
    knobs = {k: v for k, v in setting.to_dict().items() if k != "micro_batch"}
    return json.dumps({"model": model, "gpu": gpu_name, "gpu_memory": gpu_memory,
                       "seq_len": seq_len, "world": world, "setting": knobs}, sort_keys=True)


def read_cache() -> dict:
    path = cache_path()
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        log.warning("ignoring the unreadable probe cache %s", path)
        return {}


def write_cache(key: str, result: dict) -> None:
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = read_cache()
    data[key] = result
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def cached_largest(key: str) -> int | None:
    entry = read_cache().get(key)
    return entry["largest_micro_batch"] if entry else None


# ------------------------------------------------------------------------------ trials

class Trials:
    """Real steps of one DeepSpeed engine at a given micro-batch; OOM-safe and rank-agreed."""

    def __init__(self, engine, dist, plan, seq_len: int, vocab: int,
                 simulate_bytes: int | None) -> None:
        self.engine, self.dist, self.plan = engine, dist, plan
        self.seq_len, self.vocab, self.simulate_bytes = seq_len, vocab, simulate_bytes
        self.results: dict[int, dict] = {}

    def predicted(self, micro: int) -> int:
        from ptlm.memory import estimate

        p = self.plan
        return estimate(p.model, p.hardware, p.job, p.setting.with_(micro_batch=micro)).gpu_total

    def __call__(self, micro: int) -> bool:
        from ptlm.distributed import any_rank

        oom = False
        predicted = self.predicted(micro)
        try:
            peak = self._steps(micro, predicted)
        except torch.OutOfMemoryError:
            oom, peak = True, None
        self._free()
        oom = any_rank(oom, self.dist.device)
        self.results[micro] = {"fits": not oom, **(peak or {}),
                               "predicted_bytes": predicted}
        log.info("micro-batch %d: %s%s", micro, "out of memory" if oom else "fits",
                 f", max allocated {peak['max_allocated'] / 2**30:.2f} GiB" if peak and
                 peak.get("max_allocated") else "")
        return not oom

    def _steps(self, micro: int, predicted: int) -> dict:
        engine = self.engine
        per_gpu = self.plan.global_batch // self.dist.world_size
        accum = min(per_gpu // micro, 2)  # 2 micro-steps show the accumulation's held grads
        engine.set_train_micro_batch_size(micro)
        engine.set_train_batch_size(micro * accum * self.dist.world_size)
        for step in range(PROBE_STEPS):
            if step == PROBE_STEPS - 1 and torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            for _ in range(accum):
                ids = torch.randint(0, self.vocab, (micro, self.seq_len), device=self.dist.device)
                mean, _, _ = engine(ids)
                engine.backward(mean)
                engine.step()
        if self.simulate_bytes is not None and predicted > self.simulate_bytes:
            raise torch.OutOfMemoryError(f"simulated: predicted peak above "
                                         f"{self.simulate_bytes} bytes")
        if torch.cuda.is_available():
            return {"max_allocated": torch.cuda.max_memory_allocated(),
                    "max_reserved": torch.cuda.max_memory_reserved()}
        return {}

    def _free(self) -> None:
        self.engine.zero_grad()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ command

def add_arguments(p) -> None:
    from ptlm.plan_cli import add_setting_arguments

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

    from ptlm import runsetup
    from ptlm.distributed import init
    from ptlm.facts import parse_size
    from ptlm.plan_cli import setting_overrides
    from ptlm.model import load_model
    from ptlm.trainer import LossModule

    dist = init()
    gpu = runsetup.on_gpu()
    forced = setting_overrides(args)
    config = runsetup.model_config_of(args.model)
    p = runsetup.plan_for(args.model, config, args.seq_len, args.global_batch, forced,
                          dist.world_size, gpu, use_probe_cache=False)
    model = load_model(config if args.from_scratch else args.model, precision=p.setting.precision)
    if p.setting.checkpointing:
        from ptlm.model import enable_checkpointing

        enable_checkpointing(model)
    from ptlm.dsconfig import build_ds_config
    from ptlm.optim import build_optimizer

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


def format_result(p, r: dict) -> str:
    lines = [f"probe of {p.setting.with_(micro_batch=r['largest_micro_batch']).describe()} on "
             f"{r['device']} (seq {p.job.seq_len}):",
             "| micro-batch | fits | predicted | max allocated | max reserved |",
             "|---|---|---|---|---|"]
    gib = lambda b: "–" if b is None else f"{b / 2**30:.2f} GiB"  # noqa: E731
    for m, t in r["trials"].items():
        lines.append(f"| {m} | {'yes' if t['fits'] else 'OOM'} | {gib(t['predicted_bytes'])} | "
                     f"{gib(t.get('max_allocated'))} | {gib(t.get('max_reserved'))} |")
    lines.append(f"largest micro-batch that fits: {r['largest_micro_batch']} (planned "
                 f"{r['planned_micro_batch']}); cached in {cache_path()}")
    return "\n".join(lines)
