"""`ptlm inspect DIR`: summarize a prepared dataset and decode the first block of each split."""

from __future__ import annotations

import json
from pathlib import Path

from ptlm.data import shards
from ptlm.data.inspection import PREVIEW_CHARS, first_blocks
from ptlm.data.prepare import summary


def add_arguments(p) -> None:
    p.add_argument("dir", type=Path, help="a folder written by `ptlm prepare`")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args) -> int:
    manifest = shards.read_manifest(args.dir)
    checked = shards.check_for_training(args.dir)  # sha256 + ids: never show corrupt data as fine
    blocks = first_blocks(args.dir, manifest)
    if args.json:
        print(json.dumps({"manifest": manifest, "first_blocks": blocks}, indent=2,
                         ensure_ascii=False))
        return 0
    print(f"{args.dir}")
    print(summary(manifest))
    if checked["max_id"] is not None:
        hashed = "sha256 of every shard and " if checked["mode"] == "full" else ""
        print(f"checked ({shards.DATA_CHECK_ENV}={checked['mode']}): {hashed}largest token id "
              f"{checked['max_id']} < vocabulary {manifest['tokenizer']['vocab_size']}")
    for split, block in blocks.items():
        print(f"\n--- first {split} block, decoded ---")
        if block is None:
            print("(no blocks)")
            continue
        text = block["text"]
        print(text[:PREVIEW_CHARS] + (" […]" if len(text) > PREVIEW_CHARS else ""))
    return 0


