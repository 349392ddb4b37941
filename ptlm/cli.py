"""ptlm: fine-tune or continue pretraining causal LMs on the GPUs you have.

Each subcommand lives in its own module, ptlm/commands/NAME.py, exposing `add_arguments(parser)` and `run(args) -> int`.
Only the invoked command's module is imported, so `ptlm prepare` never pays for importing
torch/transformers/deepspeed (it keeps prepare's resident memory small).
"""

from __future__ import annotations

import argparse
import importlib
import re
import logging
import sys

from ptlm import __version__
from ptlm.errors import PtlmError

# name -> one-line help; the code is ptlm/commands/NAME.py. Add a command by adding a row.
COMMANDS: dict[str, str] = {
    "prepare": "tokenize, pack and shard a corpus into Arrow files",
    "inspect": "summarize a prepared dataset and decode its first blocks",
    "verify": "check every shard's sha256 against the manifest",
    "plan": "choose precision/ZeRO/offload/checkpointing/micro-batch that fit",
    "probe": "confirm a plan with real steps: largest micro-batch that fits",
    "train": "train with DeepSpeed (same as `deepspeed launch/train.py`)",
    "eval": "validation loss and perplexity of a model on prepared data or text",
    "generate": "continue a prompt with a trained model",
    "demo": "run the built-in demo on the shipped Portuguese sample",
}


def _build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptlm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ptlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            mod = importlib.import_module(f"ptlm.commands.{name}")
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


_NUMBER = re.compile(r"^-\d+(\.\d*)?$")  # what argparse itself reads as a negative value


def _join_negative_values(argv: list[str]) -> list[str]:
    """argparse takes '-16GiB' after a flag for another flag and prints its usage ('expected one
    argument'): such a value (a '-' then a digit, not a plain number, which argparse reads
    itself) is joined to its flag, `--gpu-memory=-16GiB`, so the flag's own check refuses it in
    one line."""
    out: list[str] = []
    for a in argv:
        if (out and out[-1].startswith("--") and "=" not in out[-1] and a[:1] == "-"
                and a[1:2].isdigit() and not _NUMBER.match(a)):
            out[-1] = f"{out[-1]}={a}"
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _join_negative_values(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = _build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 1
    logging.basicConfig(level=logging.INFO, format="[ptlm %(levelname)s] %(message)s")
    try:
        return int(args._run(args) or 0)
    except PtlmError as e:
        print(f"ptlm {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
