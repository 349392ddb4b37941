"""`ptlm probe` (also `deepspeed launch/probe.py`): confirm a plan on the real device.

Runs real training steps of the planned setting on random tokens, searching the largest
micro-batch that fits, each trial in an engine built for its micro-batch (ptlm.run.engine.rebuild,
as the run's out-of-memory back-off builds one): an out-of-memory error is caught, memory freed,
and a smaller micro-batch tried (every rank agrees on each outcome, so ranks never diverge). Measured
`torch.cuda.max_memory_allocated` / `max_memory_reserved` are printed beside the prediction and the
result is cached; `launch/train.py --plan auto` then never plans a micro-batch above what the probe
saw fit on this GPU.

Without a GPU the search still runs real DeepSpeed steps (CPU ranks), and `--simulate-gpu-memory`
stands in for the one thing a CPU cannot have, a GPU's memory size: a trial whose predicted peak
exceeds it raises the same OutOfMemoryError a GPU would.
"""

from __future__ import annotations

import gc
import logging

import numpy as np
import torch

from ptlm.data.reader import Batch
from ptlm.model.packing import stand_in_positions
from ptlm.plan.memory import estimate
from ptlm.plan.planner import with_micro_batch
from ptlm.plan.probe_cache import cache_path
from ptlm.run.engine import rebuild
from ptlm.run.machine.distributed import any_rank

log = logging.getLogger(__name__)

PROBE_STEPS = 2  # optimizer steps per trial: the 2nd has optimizer states (steady state)


# ------------------------------------------------------------------------------ trials

class Trials:
    """Real steps at a given micro-batch, each trial in an engine built for it; OOM-safe and
    rank-agreed."""

    def __init__(self, build, dist, plan, batches, simulate_bytes: int | None) -> None:
        """build(plan) -> Engine (ptlm.run.engine.build_engine, as the run builds it);
        batches(micro) -> the Batch one micro-step of the run would take (probe_batches)."""
        self.build, self.dist, self.plan = build, dist, plan
        self.batches, self.simulate_bytes = batches, simulate_bytes
        self.results: dict[int, dict] = {}
        self.engine = None
        self.record: dict | None = None  # the last engine's (Engine.record)

    def predicted(self, micro: int) -> int:
        p = self.plan
        return estimate(p.model, p.hardware, p.job, p.setting.with_(micro_batch=micro)).gpu_total

    def __call__(self, micro: int) -> bool:
        oom = False
        predicted = self.predicted(micro)
        try:
            peak = self._steps(micro, predicted)
        except torch.OutOfMemoryError:
            oom, peak = True, None
        self._release()
        oom = any_rank(oom, self.dist.device)
        self.results[micro] = {"fits": not oom, **(peak or {}),
                               "predicted_bytes": predicted}
        log.info("micro-batch %d: %s%s", micro, "out of memory" if oom else "fits",
                 f", max allocated {peak['max_allocated'] / 2**30:.2f} GiB" if peak and
                 peak.get("max_allocated") else "")
        return not oom

    def _steps(self, micro: int, predicted: int) -> dict:
        """PROBE_STEPS optimizer steps of `accum` micro-steps in an engine built for `micro`
        (ptlm.run.engine.rebuild: how the run changes its micro-batch too)."""
        per_gpu = self.plan.global_batch // self.dist.world_size
        accum = min(per_gpu // micro, 2)  # 2 micro-steps show the accumulation's held grads
        plan = with_micro_batch(self.plan, micro, micro * accum * self.dist.world_size)
        built = rebuild(self.build, plan, self._release)
        self.engine, self.record = built.engine, built.record()
        del built  # the trial's engine is self.engine alone: _release frees it
        for step in range(PROBE_STEPS):
            if step == PROBE_STEPS - 1 and torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            for _ in range(accum):
                batch = self.batches(micro)
                mean, _, _ = self.engine(batch.input_ids, None, batch.positions)
                self.engine.backward(mean)
                self.engine.step()
        if self.simulate_bytes is not None and predicted > self.simulate_bytes:
            raise torch.OutOfMemoryError(f"simulated: predicted peak above "
                                         f"{self.simulate_bytes} bytes")
        if torch.cuda.is_available():
            return {"max_allocated": torch.cuda.max_memory_allocated(),
                    "max_reserved": torch.cuda.max_memory_reserved()}
        return {}

    def _release(self) -> None:
        """Drop the trial's engine (the next one is built after the memory is free)."""
        self.engine = None  # DeepSpeed's engine frees its hooks and buffers when collected
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def probe_batches(packing: str, data, seq_len: int, vocab: int, device):
    """micro -> a Batch shaped as the run's: the data's first blocks when it is given (their
    document structure too), else random tokens with stand-in documents."""
    def batches(micro: int) -> Batch:
        if data is not None:
            return data.blocks_of(np.arange(micro) % len(data)).to(device)
        ids = torch.randint(0, vocab, (micro, seq_len), device=device)
        if packing == "stream":
            return Batch(ids)
        return Batch(ids, stand_in_positions(micro, seq_len, device))
    return batches


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
