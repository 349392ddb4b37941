"""`ptlm train` (also `deepspeed launch/train.py ...`): the training run."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ptlm.commands.flags import add_dataclass_arguments, dataclass_values
from ptlm.errors import PtlmError
from ptlm.run.config import RunConfig, option_owners
from ptlm.run.machine.distributed import shutdown
from ptlm.run.trainer import train


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every RunConfig field is a flag (ptlm.commands.flags.add_dataclass_arguments)."""
    p.add_argument("--config", type=Path, help="YAML file of run options, flat keys named like "
                                               "the flags with underscores (flags win)")
    add_dataclass_arguments(p, RunConfig)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # added by the deepspeed launcher


def run(args) -> int:
    clean = False
    try:
        summary = train(from_args(args))
        clean = True
    finally:
        shutdown(clean)
    r = summary["run"]
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {r['steps']} steps, val ppl {r['initial_val_ppl']:.2f} -> "
              f"{r['final_val_ppl']:.2f}; report in {args.out or 'the run folder'}")
    return 0


def from_args(args: argparse.Namespace) -> RunConfig:
    """YAML values (--config) under the flags that were given."""
    import yaml

    values: dict = {}
    if args.config:
        try:
            values = yaml.safe_load(args.config.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise PtlmError(f"--config {args.config}: {e}") from None
        if not isinstance(values, dict):
            raise PtlmError(f"--config {args.config}: expected a mapping of run options "
                            f"(e.g. lr: 0.0003), got {type(values).__name__}")
        unknown = set(values) - set(option_owners())
        if unknown:
            raise PtlmError(f"--config {args.config}: unknown keys {sorted(unknown)}; the keys "
                            "are the flags of `ptlm train --help` with underscores")
    values.update(dataclass_values(args, RunConfig))
    return RunConfig.from_flat(values)
