"""Flags declared once. `add_dataclass_arguments` turns a dataclass's fields into flags (field
`max_steps` -> `--max-steps`, type from the annotation, help/choices/metavar from the field's
metadata), so `ptlm train` (ptlm.run.config.RunConfig) and the Setting knobs of `ptlm plan` /
`ptlm probe` / `ptlm train` (ptlm.plan.setting.Forced: a knob that is given is forced, the planner
chooses the rest) have no hand-written flags. Also the hardware to plan for."""

from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, fields, is_dataclass

from ptlm.errors import PtlmError
from ptlm.plan.facts import KNOWN_GPUS, HardwareFacts, lookup_gpu
from ptlm.plan.setting import Forced
from ptlm.run.machine import hardware  # the only module that touches torch.cuda / psutil (lazily)
from ptlm.run.config import field_type
from ptlm.units import parse_size

ON_OFF = {"on": True, "off": False}
SETTING_TITLE = "setting (force any of these; the rest is chosen)"


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, title: str | None = None,
                            ) -> None:
    """One flag per field of dataclass `cls`; a field whose type is itself a dataclass becomes
    an argument group (titled by its docstring) of its own fields. Flags default to None (not
    given), so YAML values and the dataclass defaults apply; `dataclass_values` reads them back.

    bool -> `--x` / `--no-x`; `bool | None` (a tri-state knob) -> `--x on|off`;
    tuple[T, T] -> two values; `choices` / `metavar` from the metadata."""
    target = parser.add_argument_group(title) if title else parser
    for f in fields(cls):
        base, optional = field_type(cls, f)
        if is_dataclass(base):
            add_dataclass_arguments(parser, base, (base.__doc__ or base.__name__).strip()
                                    .splitlines()[0])
            continue
        help_text = f.metadata.get("help")
        if not help_text:
            raise TypeError(f"{cls.__name__}.{f.name} has no help text: declare it with "
                            "field(metadata={'help': ...})")
        if f.default not in (MISSING, None) and base is not bool:
            help_text += f" (default: {_shown(f.default)})"
        kw: dict = {"dest": f.name, "default": None, "help": help_text}
        if base is bool and optional:
            kw.update(type=_on_off, metavar="{on,off}")
        elif base is bool:
            kw.update(action=argparse.BooleanOptionalAction)
            if f.default is not MISSING:
                kw["help"] += f" (default: {'on' if f.default else 'off'})"
        elif typing.get_origin(base) is tuple:
            items = typing.get_args(base)
            kw.update(type=items[0], nargs="+" if items[-1] is Ellipsis else len(items))
        else:
            kw["type"] = base
        for key in ("choices", "metavar"):
            if key in f.metadata:
                kw[key] = f.metadata[key]
        target.add_argument("--" + f.name.replace("_", "-"), **kw)


def dataclass_values(args: argparse.Namespace, cls) -> dict:
    """The flags of `cls` (and its nested groups) that were given, flat: {field name: value}."""
    values = {}
    for f in fields(cls):
        base, _ = field_type(cls, f)
        if is_dataclass(base):
            values.update(dataclass_values(args, base))
        elif getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    return values


def _on_off(text: str) -> bool:
    if text.lower() not in ON_OFF:
        raise argparse.ArgumentTypeError(f"give on or off, not {text!r}")
    return ON_OFF[text.lower()]


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """The Setting knobs (ptlm.plan.setting.Forced) as flags; each one given is forced."""
    add_dataclass_arguments(parser, Forced, SETTING_TITLE)


def forced_from_args(args: argparse.Namespace) -> Forced:
    """The Setting knobs the user forced."""
    return Forced(**dataclass_values(args, Forced))


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
    """--gpu / --gpus / --gpu-memory, else this machine's GPUs (ptlm.run.machine.hardware.facts)."""
    for flag, value, what in (("--gpus", args.gpus, "GPUs per node"), ("--nodes", args.nodes,
                                                                      "nodes")):
        if value is not None and value < 1:
            raise PtlmError(f"{flag} {value}: nothing to plan for; give {flag} 1 or more ({what}), "
                            "e.g. --gpu T4 --gpus 1")
    spec = None
    if args.gpu:
        spec = lookup_gpu(args.gpu)
        if spec is None:
            raise PtlmError(f"unknown GPU {args.gpu!r}: use one of {', '.join(KNOWN_GPUS)}, or "
                            "--gpus N --gpu-memory SIZE")
    hw = hardware.facts(
        spec, gpus=args.gpus, nodes=args.nodes, no_bf16=args.no_bf16,
        gpu_memory=_size("--gpu-memory", args.gpu_memory) if args.gpu_memory else None,
        host_memory=_size("--host-memory", args.host_memory) if args.host_memory else None)
    if hw.gpus_per_node == 0:
        raise PtlmError("no CUDA GPU detected here: say which GPUs to plan for, e.g. --gpu T4, "
                        "--gpu A100-80GB --gpus 8, or --gpus 1 --gpu-memory 16GiB")
    return hw


def _size(flag: str, text: str) -> int:
    """Bytes of a memory flag: a readable size above 0 (0 or less plans for nothing)."""
    try:
        value = parse_size(text)
    except PtlmError:
        value = -1
    if value <= 0:
        raise PtlmError(f"{flag} {text}: give a memory size above 0, e.g. {flag} 16GiB "
                        "(or 40GB, 512MiB)")
    return value
