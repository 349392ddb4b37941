"""`ptlm plan`: which setting to train MODEL with on these GPUs, and why.

    ptlm plan --model opt-125m --seq-len 1024 --global-batch 16 --gpu T4
    ptlm plan --model ./my-model --seq-len 2048 --gpus 8 --gpu-memory 40GiB --zero 3 --json

The Setting flags (`add_setting_arguments` / `forced_from_args`, generated from
ptlm.plan.setting.Forced) are shared with `ptlm probe` and `ptlm train`: a flag that is given is
forced, the planner chooses the rest.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ptlm.commands.flags import (
    add_hardware_arguments,
    add_setting_arguments,
    forced_from_args,
    hardware_from_args,
)
from ptlm.data.documents import DEFAULT_PACKING, PACKINGS
from ptlm.errors import PtlmError
from ptlm.model.config import model_facts, resolve_config
from ptlm.plan.dsconfig import OptimizerHyper, engine_config
from ptlm.plan.facts import KNOWN_CONFIGS, GiB
from ptlm.plan.memory import Job
from ptlm.plan.planner import Plan, plan


MIN_SEQ_LEN = 2  # one token of context, one to predict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help=f"folder / config.json, Hub name, or one of {', '.join(KNOWN_CONFIGS)}")
    parser.add_argument("--seq-len", type=int, required=True, metavar="N")
    parser.add_argument("--global-batch", type=int, metavar="B",
                        help="sequences per optimizer step over all GPUs (default: largest that fits)")
    parser.add_argument("--packing", choices=PACKINGS, default=DEFAULT_PACKING,
                        help="as `ptlm train --packing`: documents (default) counts the "
                             "block-causal mask the step carries")
    add_hardware_arguments(parser)
    add_setting_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print the plan as JSON")
    out.add_argument("--write-ds-config", metavar="FILE", type=Path,
                     help="write the complete DeepSpeed config for the plan: the one "
                          "`ptlm train` builds its engine with (its ds_config.json)")
    out.add_argument("--verify", action="store_true",
                     help="run one real training step of the chosen setting under FakeTensorMode "
                          "(no GPU, no compute) and print its measured peak beside the prediction")
    out.add_argument("--lr", type=float, default=OptimizerHyper.lr,
                     help="learning rate in the written config (default: %(default)g, ptlm train's)")
    out.add_argument("--weight-decay", type=float, default=OptimizerHyper.weight_decay,
                     help="AdamW weight decay in the written config (default: %(default)g)")


def run(args: argparse.Namespace) -> int:
    if args.seq_len < MIN_SEQ_LEN:
        raise PtlmError(f"--seq-len {args.seq_len}: a block needs {MIN_SEQ_LEN} tokens or more "
                        "(each predicts the next); give e.g. --seq-len 1024")
    if args.global_batch is not None and args.global_batch < 1:
        raise PtlmError(f"--global-batch {args.global_batch}: give 1 or more sequences per "
                        "optimizer step, or leave it out (the largest that fits)")
    model = model_facts(args.model, args.seq_len)
    hw = hardware_from_args(args)
    job = Job(seq_len=args.seq_len, global_batch=args.global_batch,
              documents=args.packing == "documents")
    result = plan(model, hw, job, forced_from_args(args).to_dict())
    if not args.host_memory and hw.host_memory_bytes:
        result.notes.append(f"host RAM: this machine's {hw.host_memory_bytes / GiB:.0f} GiB; pass "
                            "--host-memory to plan for another machine")
    if args.write_ds_config:
        _write_ds_config(result, args)
    verified = verify(args.model, result) if args.verify else None
    if args.json:
        print(json.dumps({**result.to_dict(), **({"verify": verified} if verified else {})},
                         indent=2))
    else:
        print(format_plan(result))
        if verified:
            print(format_verify(verified))
    return 0


def verify(model_spec: str, p: Plan) -> dict:
    """Measure the chosen setting's step under FakeTensorMode + MemTracker (ptlm.run.tools.memtrace)."""
    from ptlm.run.tools.memtrace import measure_step  # torch: only with --verify

    setting = p.setting
    if setting.zero != 0 or setting.offload != "none":
        return {"skipped": f"{setting.describe()}: --verify measures one device (ZeRO-0 without "
                           "offload); sharded settings rest on DeepSpeed's own accounting"}
    config = resolve_config(model_spec)
    m = measure_step(config, setting, p.job.seq_len, attn="auto",
                     packing="documents" if p.job.documents else "stream")
    predicted = p.memory.peak_tensor_bytes
    return {"measured_peak_bytes": m["peak_bytes"], "predicted_peak_tensor_bytes": predicted,
            "error": predicted / m["peak_bytes"] - 1, "measured_phase": m["peak_phase"],
            "seconds": m["seconds"]}


def format_verify(v: dict) -> str:
    if "skipped" in v:
        return f"\nVerify: skipped ({v['skipped']})"
    return (f"\nVerify (one real step under FakeTensorMode, {v['seconds']:.0f} s): measured peak "
            f"tensors {v['measured_peak_bytes'] / GiB:.2f} GiB (at the {v['measured_phase']}), "
            f"predicted {v['predicted_peak_tensor_bytes'] / GiB:.2f} GiB ({v['error']:+.1%})")


def _write_ds_config(result: Plan, args: argparse.Namespace) -> None:
    config = engine_config(result, OptimizerHyper(lr=args.lr, weight_decay=args.weight_decay))
    args.write_ds_config.parent.mkdir(parents=True, exist_ok=True)
    args.write_ds_config.write_text(json.dumps(config, indent=2) + "\n")
    result.notes.append(f"DeepSpeed config written to {args.write_ds_config}")


def _gib(n: int) -> str:
    return f"{n / GiB:7.2f}"


def format_plan(p: Plan) -> str:
    c, m, s = p.chosen, p.memory, p.setting
    tokens = c.global_batch * p.job.seq_len
    lines = [
        f"{p.model.describe()}",
        f"on {p.hardware.describe()}, seq {p.job.seq_len}, global batch "
        f"{p.job.global_batch if p.job.global_batch else 'not set'}, "
        f"{'documents' if p.job.documents else 'stream'} packing",
        "",
        f"Chosen: {s.describe()}",
        f"  {s.micro_batch} micro-batch × {c.grad_accum} accumulation × {p.hardware.world} GPU(s)"
        f" = global batch {c.global_batch} ({tokens:,} tokens/step)",
        f"  predicted {c.tokens_per_s:,.0f} tokens/s, {c.step_seconds:.2f} s/step, MFU {c.mfu:.0%}",
        "  memory per GPU (GiB):",
    ]
    lines += _breakdown_lines(p)
    host = f"{m.host_total / GiB:.1f} GiB (model states {m.host_model_states / GiB:.1f}, " \
           f"processes {m.host_overhead / GiB:.1f})"
    have = p.hardware.host_memory_bytes
    lines.append(f"  host RAM per node: {host}"
                 + (f" of {have / GiB:.0f} GiB" if have else " (host RAM unknown: not checked)"))
    lines += ["", f"Why: {p.why}"]
    lines += [f"Note: {n}" for n in p.notes]
    if p.alternatives:
        lines += ["", "Also fits:"]
        lines += [f"  {a.tokens_per_s:>12,.0f} tokens/s  {a.memory.gpu_total / GiB:6.1f} GiB  "
                  f"{a.setting.describe()} × {a.grad_accum} accumulation" for a in p.alternatives]
    if p.rejected:
        lines += ["", f"Rejected ({len(p.rejected)}):"]
        lines += [f"  {r.reason}" for r in p.rejected]
    return "\n".join(lines)


def _peak_moments(m) -> list[tuple[str, list[tuple[str, int]], list[str]]]:
    """The moments MemoryBreakdown's peak is the largest of (forward_backward_peak, step_peak),
    each as (name, rows that add up to its bytes, labels of the fields not counted then)."""
    kept_buffers = m.ds_buffers if m.ds_buffers_persist else 0
    kept = [("parameters", m.parameters), ("optimizer states", m.optimizer_states)]
    kept += [("gradients (kept)", m.gradients)] if m.grads_persist else []
    kept += [("DeepSpeed buffers (kept)", kept_buffers)] if kept_buffers else []
    staging = [("offload staging buffer", m.offload_staging)] if m.offload_staging else []
    kept += staging
    grads_later = [] if m.grads_persist else ["gradients"]
    buckets_later = ["DeepSpeed buffers"] if m.ds_buffers > kept_buffers else []
    loss = kept + [("activations", m.activations), ("loss / logits", m.loss)]
    layer = kept + [("activations", m.activations), ("layer backward", m.layer_backward)]
    layer += ([("DeepSpeed buckets (backward)", m.ds_buffers - kept_buffers)]
              if m.ds_buffers > kept_buffers else [])
    end = kept + [("backward end", m.backward_end)]
    step = [("parameters", m.parameters), ("gradients", m.gradients),
            ("optimizer states", m.optimizer_states), ("fp32 grads (step)", m.fp32_grads),
            ("flatten copies (step)", m.flatten_copies)]
    step += [("DeepSpeed buffers (kept)", kept_buffers)] if kept_buffers else []
    step += staging
    step_only = ["fp32 grads (step)", "flatten copies (step)"]
    return [
        ("forward/backward: the loss", loss,
         grads_later + buckets_later + ["layer backward", "backward end"] + step_only),
        ("forward/backward: one layer's backward", layer,
         grads_later + ["loss / logits", "backward end"] + step_only),
        ("forward/backward: end of the backward", end,
         ["activations", "loss / logits", "layer backward"] + step_only),
        ("optimizer step", step,
         buckets_later + ["activations", "loss / logits", "layer backward", "backward end"]),
    ]


_FIELD_OF_LABEL = {"parameters": "parameters", "gradients": "gradients",
                   "optimizer states": "optimizer_states", "DeepSpeed buffers": "ds_buffers",
                   "activations": "activations",
                   "loss / logits": "loss", "layer backward": "layer_backward",
                   "backward end": "backward_end", "fp32 grads (step)": "fp32_grads",
                   "flatten copies (step)": "flatten_copies",
                   "offload staging buffer": "offload_staging"}


def _breakdown_lines(p: Plan) -> list[str]:
    """The terms live at the peak, adding up to it, then the terms live at other moments."""
    m = p.memory
    moments = [(name, rows, absent, sum(v for _, v in rows))
               for name, rows, absent in _peak_moments(m)]
    at_peak = [mo for mo in moments if mo[3] == m.peak_tensor_bytes
               and (mo[0] == "optimizer step") == (m.peak_phase == "optimizer step")]
    if at_peak:
        name, rows, absent, _ = at_peak[0]
        lines = [f"    {label:<28}{_gib(value)}" for label, value in rows]
        lines.append(f"    {'= peak tensors':<28}{_gib(m.peak_tensor_bytes)}  ({name})")
        others = ", ".join(f"{label} {getattr(m, _FIELD_OF_LABEL[label]) / GiB:.2f}"
                           for label in absent if getattr(m, _FIELD_OF_LABEL[label]))
        if others:
            lines.append(f"    not counted at that moment: {others}")
        lines.append("    other moments: " + ", ".join(
            f"{n.split(': ')[-1]} {total / GiB:.2f}" for n, _, _, total in moments if n != name))
    else:  # the memory model changed shape: show its fields, and say they do not add up
        lines = [f"    {label:<28}{_gib(getattr(m, field))}"
                 for label, field in _FIELD_OF_LABEL.items()]
        lines.append(f"    {'= peak tensors':<28}{_gib(m.peak_tensor_bytes)}  (at the "
                     f"{m.peak_phase}; the rows above are every term, not the terms of the peak, "
                     "and do not add up to it)")
    lines += [
        f"    {'+ allocator headroom':<28}{_gib(m.allocator_headroom)}",
        f"    {'+ CUDA context (+NCCL)':<28}{_gib(m.cuda_context)}",
        f"    {'= total':<28}{_gib(m.gpu_total)}  of {p.hardware.gpu_memory_bytes / GiB:.2f} GiB",
    ]
    return lines
