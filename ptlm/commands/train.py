"""`ptlm train` (also `deepspeed launch/train.py ...`): the training run."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields
from pathlib import Path

from ptlm.commands.flags import add_setting_arguments, setting_overrides
from ptlm.errors import PtlmError
from ptlm.run.config import SCHEDULES, RunConfig
from ptlm.run.trainer import train


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML file of run options (flags win)")
    p.add_argument("--model", help="hub name, local HF folder, or a ptlm alias (opt-125m, gpt2)")
    p.add_argument("--data", type=Path, help="folder written by `ptlm prepare`")
    p.add_argument("--out", type=Path, help="run folder (checkpoints, metrics, report, export)")
    p.add_argument("--from-scratch", action="store_true", default=None,
                   help="random init from the model's config (vocab sized to the data)")
    p.add_argument("--tokenizer", help="check that the data was made with this tokenizer")
    p.add_argument("--plan", help="'auto' (default) or a plan JSON from `ptlm plan --json`")
    p.add_argument("--ds-config", help="DeepSpeed template (ds_configs/*.json); 'auto' values "
                                       "are filled from the plan")
    add_setting_arguments(p)
    p.add_argument("--global-batch", type=int, help="sequences per optimizer step (all ranks)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--max-tokens", type=int, help="token budget (sets the number of steps)")
    p.add_argument("--lr", type=float)
    p.add_argument("--min-lr-ratio", type=float)
    p.add_argument("--schedule", choices=SCHEDULES)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--warmup-ratio", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-max-blocks", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--save-every-minutes", type=float)
    p.add_argument("--keep-last", type=int)
    p.add_argument("--resume", help="auto (default): latest complete checkpoint in --out; none; "
                                    "or a checkpoint folder")
    p.add_argument("--seed", type=int)
    p.add_argument("--overfit-docs", type=int, help="train (and evaluate) on the first N "
                                                    "documents only: can the loop learn?")
    p.add_argument("--log-every", type=int)
    p.add_argument("--no-export", dest="export", action="store_false", default=None)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # added by the deepspeed launcher


def run(args) -> int:
    summary = train(from_args(args))
    r = summary["run"]
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {r['steps']} steps, val ppl {r['initial_val_ppl']:.2f} -> "
              f"{r['final_val_ppl']:.2f}; report in {args.out or 'the run folder'}")
    return 0


def from_args(args: argparse.Namespace) -> RunConfig:
    import yaml

    values: dict = {}
    if args.config:
        try:
            values = yaml.safe_load(args.config.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise PtlmError(f"--config {args.config}: {e}") from None
        unknown = set(values) - {f.name for f in fields(RunConfig)}
        if unknown:
            raise PtlmError(f"--config {args.config}: unknown keys {sorted(unknown)}")
    for f in fields(RunConfig):
        v = getattr(args, f.name, None)
        if v is not None and f.name != "forced":
            values[f.name] = v
    values["forced"] = {**values.get("forced", {}), **setting_overrides(args)}
    for required in ("model", "data", "out"):
        if not values.get(required):
            raise PtlmError(f"--{required} is required (on the command line or in --config)")
    return RunConfig(**values)
