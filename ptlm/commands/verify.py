"""`ptlm verify DIR`: check every shard's sha256 and structure against the manifest."""

from __future__ import annotations

from pathlib import Path

from ptlm.data import shards
from ptlm.errors import PtlmError


def add_arguments(p) -> None:
    p.add_argument("dir", type=Path, help="a folder written by `ptlm prepare`")


def run(args) -> int:
    problems = shards.verify(args.dir)
    if problems:
        raise PtlmError(f"{args.dir} failed verification:\n  " + "\n  ".join(problems)
                        + f"\nRe-run `ptlm prepare ... --out {args.dir}` to rebuild it")
    manifest = shards.read_manifest(args.dir)
    n = sum(len(s["shards"]) for s in manifest["splits"].values())
    print(f"{args.dir}: OK ({n} shards, sha256 and structure match the manifest)")
    return 0
