"""`ptlm inspect DIR` (manifest summary + first block of each split, decoded) and
`ptlm verify DIR` (every shard's sha256 and structure against the manifest)."""

from __future__ import annotations

from pathlib import Path

from ptlm.data import shards
from ptlm.data import tokenizer as toks

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
