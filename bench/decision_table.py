"""Print the planner's decision table (markdown) for the reference cases in docs/planner.md.

    python bench/decision_table.py [--seq-len 1024]
    python bench/decision_table.py --calibration      # memory model vs measurements (~2 min)

Pure planning (ptlm.plan.planner.plan): no GPU is needed and nothing runs. Host RAM per machine is
an assumption stated in the table (typical cloud shapes), since offload plans depend on it.
--calibration compares ptlm.plan.memory.estimate with the reference figures and with
ptlm.run.tools.memtrace (a real step of ptlm's loop under FakeTensorMode + MemTracker, on CPU).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ptlm.errors import PtlmError
from ptlm.model.config import known_config, model_facts
from ptlm.plan.facts import KNOWN_GPUS, GiB, HardwareFacts
from ptlm.plan.memory import PRECISION_BYTES, Job, estimate
from ptlm.plan.planner import plan
from ptlm.plan.setting import PLAIN_HF, Setting


@dataclass(frozen=True)
class Case:
    model: str
    gpu: str
    gpus: int
    host_gib: int  # host RAM per node assumed
    global_batch: int


CASES = [
    Case("opt-125m", "T4", 1, 64, 16),
    Case("opt-125m", "A100-40GB", 1, 85, 16),
    Case("opt-125m", "H100-80GB", 1, 200, 16),
    Case("opt-1.3b", "T4", 1, 64, 16),
    Case("opt-1.3b", "A100-40GB", 1, 85, 16),
    Case("opt-1.3b", "A100-40GB", 8, 680, 64),
    Case("opt-6.7b", "A100-80GB", 1, 170, 16),
    Case("opt-6.7b", "A100-40GB", 8, 680, 64),
    Case("opt-13b", "T4", 1, 64, 16),
]

HEADER = ("| model | GPUs (host RAM) | global batch | chosen setting | micro × accum | "
          "peak / GPU memory | predicted tokens/s (MFU) |")


def row(case: Case, seq_len: int) -> str:
    model = model_facts(case.model)
    hw = HardwareFacts.from_spec(KNOWN_GPUS[case.gpu], case.gpus,
                                 host_memory_bytes=case.host_gib * GiB)
    where = f"{case.gpus}× {case.gpu} ({case.host_gib} GiB)"
    try:
        p = plan(model, hw, Job(seq_len, case.global_batch))
    except PtlmError as e:
        return f"| {model.name} | {where} | {case.global_batch} | **does not fit**: {e} | | | |"
    s, c = p.setting, p.chosen
    setting = s.describe().rsplit(", micro-batch", 1)[0]
    return (f"| {model.name} | {where} | {c.global_batch} | {setting} | {s.micro_batch} × "
            f"{c.grad_accum} | {c.memory.gpu_total / GiB:.1f} / {hw.gpu_memory_bytes / GiB:.1f} GiB"
            f" | {c.tokens_per_s:,.0f} ({c.mfu:.0%}) |")


# Plain-HF OPT-125M peaks measured for docs/reference-figures.md (fp32, AdamW, SDPA;
# that loop kept the model outputs alive through backward): (seq, micro-batch, checkpointing, GiB).
REFERENCE_PEAKS = [(1024, 16, False, 21.65), (1024, 16, True, 14.33), (1024, 4, False, 6.46),
                   (2048, 4, False, 11.53)]
MEMTRACE_CASES = [  # (setting, seq_len) on OPT-125M
    (PLAIN_HF.with_(micro_batch=16), 1024),
    (PLAIN_HF.with_(micro_batch=16, checkpointing=True), 1024),
    (PLAIN_HF.with_(micro_batch=4), 2048),
    (Setting("bf16", chunked_loss=False, micro_batch=16), 1024),
    (Setting("bf16", chunked_loss=True, micro_batch=16), 1024),
    (Setting("bf16", checkpointing=True, chunked_loss=True, micro_batch=16), 1024),
    (Setting("fp16", optimizer="adamw8bit", chunked_loss=True, micro_batch=16), 1024),
    (Setting("fp32", chunked_loss=True, micro_batch=16), 1024),
    (Setting("fp32", checkpointing=True, chunked_loss=True, micro_batch=16), 1024),
    (Setting("bf16", checkpointing=True, chunked_loss=True, micro_batch=2), 1024),
]
CUDA_MASK_BYTES = 1  # CUDA saves dropout masks as bool; CPU (memtrace) in the activation dtype


def calibration() -> None:
    from ptlm.run.tools.memtrace import measure_step

    model, cfg = model_facts("opt-125m"), known_config("opt-125m")
    hw = HardwareFacts.from_spec(KNOWN_GPUS["H100-80GB"])
    print("Reference figures (plain HF loop holding its outputs: Job(keep_outputs=True))\n")
    print("| seq × micro-batch | checkpointing | measured GiB | estimate GiB | diff |\n|---|---|---|---|---|")
    for seq, micro, ckpt, measured in REFERENCE_PEAKS:
        setting = PLAIN_HF.with_(micro_batch=micro, checkpointing=ckpt)
        est = estimate(model, hw, Job(seq, keep_outputs=True), setting).peak_tensor_bytes / GiB
        print(f"| {seq} × {micro} | {'on' if ckpt else 'off'} | {measured:.2f} | {est:.2f} | "
              f"{est / measured - 1:+.1%} |")
    print("\nptlm.run.tools.memtrace (ptlm's loop, CPU). 'CUDA-equivalent' removes the CPU-only excess of the "
          "dropout masks (stored in the activation dtype on CPU, as bool on CUDA) from layers that "
          "keep their activations.\n")
    print("| setting | seq × micro-batch | measured GiB (phase) | CUDA-equivalent | estimate GiB | "
          "diff |\n|---|---|---|---|---|---|")
    for setting, seq in MEMTRACE_CASES:
        measured = measure_step(cfg, setting, seq)
        layers = model.layers if not setting.checkpointing else 1
        excess = (2 * (PRECISION_BYTES[setting.precision] - CUDA_MASK_BYTES) * model.hidden
                  * setting.micro_batch * seq * layers)
        cuda = (measured["peak_bytes"] - excess) / GiB
        est = estimate(model, hw, Job(seq), setting).peak_tensor_bytes / GiB
        print(f"| {setting.describe().rsplit(', micro-batch', 1)[0]} | {seq} × {setting.micro_batch} "
              f"| {measured['peak_bytes'] / GiB:.2f} ({measured['peak_phase']}) | {cuda:.2f} | "
              f"{est:.2f} | {est / cuda - 1:+.1%} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--calibration", action="store_true",
                        help="print the memory model's calibration tables instead")
    args = parser.parse_args()
    if args.calibration:
        calibration()
        return
    print(f"seq_len {args.seq_len}; peak = predicted peak tensors + 10% allocator headroom + "
          "CUDA context\n")
    print(HEADER)
    print("|" + "---|" * HEADER.count(" |"))
    for case in CASES:
        print(row(case, args.seq_len))


if __name__ == "__main__":
    main()
