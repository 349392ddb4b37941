"""`ptlm inspect DIR` (manifest summary + first block of each split, decoded) and
`ptlm verify DIR` (every shard's sha256 and structure against the manifest)."""

from __future__ import annotations

import json
from pathlib import Path

from ptlm import shards
from ptlm import tokenizer as toks
from ptlm.errors import PtlmError
from ptlm.prepare import summary

PREVIEW_CHARS = 600  # of each decoded first block, in the text output (--json has it whole)


def first_blocks(root: Path, manifest: dict) -> dict:
    tok = toks.load(root / manifest["tokenizer"]["path"])
    out = {}
    for split in manifest["splits"]:
        blocks = shards.open_split(root, manifest, split)
        if blocks.num_blocks == 0:
            out[split] = None
            continue
        ids = blocks.take([0])[0].tolist()
        out[split] = {"ids": ids, "text": tok.decode(ids, skip_special_tokens=False)}
    return out


def add_inspect_arguments(p) -> None:
    p.add_argument("dir", type=Path, help="a folder written by `ptlm prepare`")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run_inspect(args) -> int:
    manifest = shards.read_manifest(args.dir)
    blocks = first_blocks(args.dir, manifest)
    if args.json:
        print(json.dumps({"manifest": manifest, "first_blocks": blocks}, indent=2,
                         ensure_ascii=False))
        return 0
    print(f"{args.dir}")
    print(summary(manifest))
    for split, block in blocks.items():
        print(f"\n--- first {split} block, decoded ---")
        if block is None:
            print("(no blocks)")
            continue
        text = block["text"]
        print(text[:PREVIEW_CHARS] + (" […]" if len(text) > PREVIEW_CHARS else ""))
    return 0


def add_verify_arguments(p) -> None:
    p.add_argument("dir", type=Path, help="a folder written by `ptlm prepare`")


def run_verify(args) -> int:
    problems = shards.verify(args.dir)
    if problems:
        raise PtlmError(f"{args.dir} failed verification:\n  " + "\n  ".join(problems))
    manifest = shards.read_manifest(args.dir)
    n = sum(len(s["shards"]) for s in manifest["splits"].values())
    print(f"{args.dir}: OK ({n} shards, sha256 and structure match the manifest)")
    return 0
