"""`ptlm prepare`: tokenize, pack and shard a corpus into Arrow files (never imports torch unless
--model asks for a model's positions: ptlm.model.positions builds it on the meta device)."""

from __future__ import annotations

from pathlib import Path

from ptlm.data import sources
from ptlm.data.prepare import PrepareConfig, prepare, summary
from ptlm.model.config import resolve_config  # transformers only when called
from ptlm.model.positions import check_length  # torch only when called
from ptlm.units import parse_size


def add_arguments(p) -> None:
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help=".txt/.jsonl/.json/.parquet files, folders or globs of them, a "
                        "datasets.save_to_disk folder, or a hub dataset name (when online)")
    p.add_argument("--out", required=True, type=Path, help="output folder (DIR)")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per block")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="hub name or local folder (tokenizer.json, or GPT-2 "
                                         "vocab.json + merges.txt)")
    tok.add_argument("--train-tokenizer", type=int, metavar="VOCAB_SIZE",
                     help="train a byte-level BPE of this many ids on the corpus instead")
    p.add_argument("--eos-token", help="token appended after every document (default: the "
                                       "tokenizer's EOS)")
    p.add_argument("--model", help="check --seq-len against this model's positions")
    p.add_argument("--text-field", default="text", help="field/column holding the text")
    p.add_argument("--txt-docs", choices=sources.TXT_DOC_MODES, default="file",
                   help=".txt files: one document per file, per line, or per blank-line-"
                        "separated paragraph")
    p.add_argument("--decode-errors", choices=sources.DECODE_POLICIES, default="strict",
                   help="undecodable UTF-8: stop with an error (strict) or replace with U+FFFD")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip rows without usable text (bad JSON, no --text-field, not text) and "
                        "count them in the manifest (default: stop and list up to "
                        f"{sources.MAX_BAD_ROWS_LISTED} of them)")
    p.add_argument("--hf-split", default="train", help="split of a hub/datasets source")
    p.add_argument("--hf-config", help="config name of a hub dataset")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of tokens held out for validation, by whole documents (at least "
                        "one block; 0 is refused: training evaluates on the val split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-proc", type=int, default=1,
                   help="tokenizer processes (1 already uses every core through the Rust "
                        "tokenizer's threads)")
    p.add_argument("--shard-size", default="256MiB", help="max bytes per shard file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR")
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args) -> PrepareConfig:
    return PrepareConfig(
        sources=args.sources, out=args.out, seq_len=args.seq_len, tokenizer=args.tokenizer,
        train_tokenizer=args.train_tokenizer, eos_token=args.eos_token, model=args.model,
        val_fraction=args.val_fraction, seed=args.seed, num_proc=args.num_proc,
        overwrite=args.overwrite, shard_bytes=parse_size(args.shard_size),
        source_options=sources.SourceOptions(
            text_field=args.text_field, txt_docs=args.txt_docs, decode_errors=args.decode_errors,
            hf_split=args.hf_split, hf_config=args.hf_config, skip_bad_rows=args.skip_bad_rows),
        progress=False if args.no_progress else None)


def run(args) -> int:
    cfg = config_from_args(args)
    if cfg.model:  # before any tokenizing: a learned position table is a hard limit
        check_length(resolve_config(cfg.model), cfg.seq_len, f"--seq-len {cfg.seq_len}",
                     f"model {cfg.model}", lambda n: f"use --seq-len {n} or less")
    manifest = prepare(cfg)
    print(f"wrote {cfg.out}")
    print(summary(manifest))
    return 0
