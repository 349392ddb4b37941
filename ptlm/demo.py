"""`ptlm demo`: the whole workflow on the shipped Portuguese sample, on whatever this machine has.

prepare (train a small BPE on the sample, pack, split) -> inspect. Planning, the DeepSpeed
training run and the report join here as they land.
"""

from __future__ import annotations

import time
from pathlib import Path

from ptlm.inspect import first_blocks
from ptlm.prepare import PrepareConfig, prepare, summary

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_CORPUS = ASSETS / "demo_corpus_pt.jsonl"
DEMO_VOCAB = 1024  # the sample is ~43 KB of text: a bigger vocabulary would be mostly unused
DEMO_SEQ_LEN = 128
DEMO_VAL_FRACTION = 0.1


def add_arguments(p) -> None:
    p.add_argument("--out", type=Path, default=Path("demo_out"),
                   help="folder for the demo's data and run (replaced on each demo run)")
    p.add_argument("--seq-len", type=int, default=DEMO_SEQ_LEN)


def _banner(step: str) -> None:
    print(f"\n=== {step} " + "=" * max(0, 70 - len(step)))


def run(args) -> int:
    t0 = time.perf_counter()
    data_dir = args.out / "data"
    _banner(f"1. prepare: {DEMO_CORPUS.name} -> {data_dir}")
    manifest = prepare(PrepareConfig(
        sources=[str(DEMO_CORPUS)], out=data_dir, seq_len=args.seq_len,
        train_tokenizer=DEMO_VOCAB, val_fraction=DEMO_VAL_FRACTION, overwrite=True))
    print(summary(manifest))
    _banner("2. inspect: first validation block, decoded")
    block = first_blocks(data_dir, manifest)["val"]
    print(block["text"][:400] if block else "(no validation block)")
    print(f"\ndemo finished in {time.perf_counter() - t0:.1f} s; data in {data_dir}")
    return 0
