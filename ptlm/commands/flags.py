"""Flags shared by several commands, declared once: the Setting knobs (`ptlm plan`, `ptlm probe`,
`ptlm train`: a flag that is given is forced, the planner chooses the rest) and the hardware to
plan for."""

from __future__ import annotations

import argparse
from dataclasses import replace

from ptlm.errors import PtlmError
from ptlm.plan.facts import KNOWN_GPUS, UNKNOWN_GPU, HardwareFacts, lookup_gpu
from ptlm.plan.setting import OFFLOADS, OPTIMIZERS, PRECISIONS, ZERO_STAGES
from ptlm.units import parse_size

ON_OFF = {"on": True, "off": False}


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """The Setting knobs as flags; each one given is forced, the others are chosen."""
    g = parser.add_argument_group("setting (force any of these; the rest is chosen)")
    g.add_argument("--precision", choices=PRECISIONS)
    g.add_argument("--zero", type=int, choices=ZERO_STAGES, help="ZeRO stage")
    g.add_argument("--offload", choices=OFFLOADS,
                   help="CPU offload: optimizer (ZeRO 1-3) or parameters (ZeRO-3, implies optimizer)")
    g.add_argument("--checkpointing", choices=ON_OFF, help="gradient checkpointing of the layers")
    g.add_argument("--optimizer", choices=OPTIMIZERS)
    g.add_argument("--chunked-loss", choices=ON_OFF,
                   help="chunked LM-head + loss (never materializes the full logits)")
    g.add_argument("--micro-batch", type=int, metavar="N", help="sequences per GPU per micro-step")


def setting_overrides(args: argparse.Namespace) -> dict:
    """The Setting fields the user forced, as Setting's own types."""
    forced = {}
    for name in ("precision", "zero", "offload", "optimizer", "micro_batch"):
        if getattr(args, name, None) is not None:
            forced[name] = getattr(args, name)
    for name in ("checkpointing", "chunked_loss"):
        if getattr(args, name, None) is not None:
            forced[name] = ON_OFF[getattr(args, name)]
    return forced


def add_hardware_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("hardware (default: this machine's GPUs)")
    g.add_argument("--gpu", metavar="NAME",
                   help=f"a known GPU: {', '.join(KNOWN_GPUS)} (device names like 'Tesla T4' work)")
    g.add_argument("--gpus", type=int, metavar="G", help="GPUs per node")
    g.add_argument("--gpu-memory", metavar="SIZE", help="memory per GPU, e.g. 16GiB or 40GB")
    g.add_argument("--no-bf16", action="store_true", help="the GPU has no bf16 (e.g. T4, V100)")
    g.add_argument("--nodes", type=int, default=1, metavar="K")
    g.add_argument("--host-memory", metavar="SIZE",
                   help="host RAM per node (default: this machine's), e.g. 64GiB")


def hardware_from_args(args: argparse.Namespace) -> HardwareFacts:
    """--gpu / --gpus / --gpu-memory, else this machine's GPUs (ptlm.hardware.detect)."""
    from ptlm.run import hardware  # the only module that touches torch.cuda / psutil

    host = parse_size(args.host_memory) if args.host_memory else hardware.host_memory_bytes()
    if args.gpu:
        spec = lookup_gpu(args.gpu)
        if spec is None:
            raise PtlmError(f"unknown GPU {args.gpu!r}: use one of {', '.join(KNOWN_GPUS)}, or "
                            "--gpus N --gpu-memory SIZE")
        hw = HardwareFacts.from_spec(spec, args.gpus or 1, args.nodes, host)
    elif args.gpu_memory:
        spec = replace(UNKNOWN_GPU, name="custom GPU", memory_bytes=parse_size(args.gpu_memory))
        hw = HardwareFacts.from_spec(spec, args.gpus or 1, args.nodes, host)
    else:
        hw = _replace(hardware.detect(), nodes=args.nodes, host_memory_bytes=host)
        if hw.gpus_per_node == 0:
            raise PtlmError("no CUDA GPU detected here: say which GPUs to plan for, e.g. --gpu T4, "
                            "--gpu A100-80GB --gpus 8, or --gpus 1 --gpu-memory 16GiB")
        if args.gpus:
            hw = _replace(hw, gpus_per_node=args.gpus)
    if args.gpu_memory:
        hw = _replace(hw, gpu_memory_bytes=parse_size(args.gpu_memory))
    if args.no_bf16:
        hw = _replace(hw, bf16=False)
    return hw


def _replace(hw: HardwareFacts, **changes) -> HardwareFacts:
    return HardwareFacts(**{**hw.to_dict(), **changes})


